"""Seeded differential fuzz of the seven public functions, forward and backward, against the float64 attention
of naive.py, on the emulator (strict: a fallback fails) and on the reference backend.

Each case draws its function, dtype, head dim (1..256), batch and lengths (0..300), GQA, mask (causal, windows
of any size up to 2**63 - 1), softcap, ALiBi, softmax scale, strided views of every input, and its layout:
padded, varlen with empty sequences and loose max_seqlen bounds, or a dense (leftpad, batch_idx) or paged kv
cache with appended keys and any num_splits. It checks out and lse with the upstream rule (at most 2x the
error of plain PyTorch in the inputs' dtype, 3x for gradients, plus a small slack), the in-place append, and
that no input is modified otherwise.

A kernel is compiled per dtype, padded head dim and compiled-in feature, so the cases draw those from CONFIGS
configurations (drawn from the seed too): a run compiles a bounded number of kernels, and the disk cache keeps
them for later runs. FLASH_ATTN_METAL_FUZZ_SEED and FLASH_ATTN_METAL_FUZZ_CASES draw another set of cases
(for exploring; CI runs the defaults).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from flash_attn_metal import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from naive import call_window, dense_attention

SEED = int(os.environ.get("FLASH_ATTN_METAL_FUZZ_SEED", "1717"))
CASES = int(os.environ.get("FLASH_ATTN_METAL_FUZZ_CASES", "96"))
CONFIGS = 8  # kernel configurations per run: each compiles a forward (maybe also a split-KV one) and a backward
MAX_LEN = 300
WORK = 12_000_000  # b * h * sq * sk * d of one case: about a quarter of a second forward in the emulator
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAMILIES = ("padded", "varlen", "dense_cache", "paged_cache")
FUNCTIONS = {"padded": ("func", "kvpacked", "qkvpacked"), "varlen": ("varlen", "varlen_kvpacked", "varlen_qkvpacked"),
             "dense_cache": ("kvcache",), "paged_cache": ("kvcache",)}
HUGE_WINDOWS = (10**4, 2**40, 2**63 - 1)  # longer than any sequence: no window at all


@dataclass(frozen=True)
class Config:
    """What selects the compiled kernel: the layout family, dtype, padded head dim and features."""

    family: str
    dtype: torch.dtype
    padded_head_dim: int
    masked: bool
    softcap: bool
    alibi: bool


# (masked, softcap, alibi) of config i: each layout family meets each feature, and both families with a backward
# (padded and varlen, configs 0, 1, 4 and 5) meet all three.
FEATURES = ((True, False, True), (False, True, False), (True, False, False), (False, True, True),
            (True, True, False), (True, False, True), (False, True, True), (True, False, False))


def draw_configs(seed: int) -> list[Config]:
    """Families and dtypes in turn (so each pairs with several), features from FEATURES, head dims at random."""
    rng = random.Random(seed)
    return [Config(FAMILIES[i % len(FAMILIES)], DTYPES[i % len(DTYPES)], 8 * rng.randint(1, 32),
                   *FEATURES[i % len(FEATURES)]) for i in range(CONFIGS)]


@dataclass
class Case:
    """One drawn call; `describe` is what a failure reports (with the seed and index to rerun it)."""

    index: int
    config: Config
    function: str
    head_dim: int
    nheads: int
    nheads_k: int
    causal: bool
    window: tuple[int, int]
    softcap: float
    scale: float | None
    magnitude: float
    strided: bool
    backward: bool
    batch: int = 0
    seqlen_q: int = 0
    seqlen_k: int = 0
    lens_q: list[int] = field(default_factory=list)  # varlen and caches: per sequence
    lens_k: list[int] = field(default_factory=list)
    bound_extra: int = 0  # varlen: max_seqlen = longest + this
    alibi: str = ""  # "", "h" or "bh"
    append: bool = False  # caches: new k and v are passed (maybe with no rows)
    new_len: int = 0  # caches: appended rows per sequence
    whole_cache: bool = False  # caches: cache_seqlens=None
    rows: int = 0  # caches: a dense cache's rows, or a paged one's rows per block
    leftpad: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # dense caches: cache_batch_idx, or [] for none
    num_splits: int = 0
    seqlens_as_int: bool = False

    def describe(self) -> str:
        fields = {k: v for k, v in vars(self).items() if v not in (0, "", [], False, None) or k == "index"}
        return f"fuzz seed {SEED} case {self.index}: {fields}"


TILE_EDGES = (1, 8, 16, 32, 64, 128, 256)  # tile and block sizes: lengths next to them find off-by-ones


def draw_len(rng: random.Random, zero: float, limit: int = MAX_LEN) -> int:
    """0, a length next to a tile edge, or a short, medium or long one; at most `limit`."""
    r = rng.random()
    if r < zero:
        return 0
    if r < zero + 0.3:
        n = rng.choice(TILE_EDGES) + rng.choice((-1, 0, 1))
    elif r < 0.65:
        n = rng.randint(1, 48)
    else:
        n = rng.randint(49, 160) if r < 0.85 else rng.randint(161, MAX_LEN)
    return min(n, limit)


def draw_window(rng: random.Random, config: Config) -> tuple[bool, tuple[int, int]]:
    def side() -> int:
        r = rng.random()
        return -1 if r < 0.3 else rng.randint(0, 8) if r < 0.6 else rng.randint(9, MAX_LEN) if r < 0.85 \
            else rng.choice(HUGE_WINDOWS)

    if not config.masked:  # no window, or one too long to mask anything
        return False, (-1, -1) if rng.random() < 0.7 else (rng.choice(HUGE_WINDOWS), rng.choice(HUGE_WINDOWS))
    causal = rng.random() < 0.4
    left, right = side(), side()
    if not causal and left < 0 and right < 0:
        left = rng.randint(0, 8)
    return causal, (left, right)


def draw_case(index: int, configs: list[Config]) -> Case:
    rng = random.Random(f"{SEED}-{index}")
    config = configs[index % len(configs)]
    function = rng.choice(FUNCTIONS[config.family])
    packed_qkv = function.endswith("qkvpacked")
    hk = rng.choice((1, 1, 2, 3))
    group = 1 if packed_qkv else rng.choice((1, 2, 4))
    causal, window = draw_window(rng, config)
    head_dim = rng.randint(max(1, config.padded_head_dim - 7), config.padded_head_dim)
    case = Case(index, config, function, head_dim=head_dim,
                nheads=hk * group, nheads_k=hk, causal=causal, window=window,
                softcap=round(rng.uniform(1.0, 30.0), 2) if config.softcap else 0.0,
                scale=None if rng.random() < 0.6 else round(rng.uniform(0.05, 1.0), 3),
                magnitude=rng.choice((1.0, 1.0, 2.0, 4.0)), strided=rng.random() < 0.5,
                backward=config.family in ("padded", "varlen") and rng.random() < 0.6,
                alibi=rng.choice(("h", "bh")) if config.alibi else "")
    per_row = case.nheads * case.head_dim
    if config.family == "padded":
        case.batch = 0 if rng.random() < 0.05 else rng.choice((1, 1, 2, 3))
        case.seqlen_q = draw_len(rng, zero=0.05)
        case.seqlen_k = case.seqlen_q if packed_qkv else draw_len(rng, zero=0.05)
        while case.batch * per_row * case.seqlen_q * case.seqlen_k > WORK:
            case.seqlen_q //= 2
            case.seqlen_k = case.seqlen_q if packed_qkv else case.seqlen_k // 2
    elif config.family == "varlen":
        sequences = rng.randint(1, 4)
        case.lens_q = [draw_len(rng, zero=0.25) for _ in range(sequences)]
        case.lens_k = list(case.lens_q) if packed_qkv else [draw_len(rng, zero=0.25) for _ in range(sequences)]
        while sum(a * b for a, b in zip(case.lens_q, case.lens_k)) * per_row > WORK:
            case.lens_q = [n // 2 for n in case.lens_q]
            case.lens_k = list(case.lens_q) if packed_qkv else [n // 2 for n in case.lens_k]
        case.bound_extra = rng.choice((0, 0, 5, 10**6))
    else:
        case.batch = rng.randint(1, 3)
        case.seqlen_q = rng.choice((1, 1, rng.randint(0, 8), rng.randint(9, 64)))
        case.append = rng.random() < 0.7
        case.new_len = rng.randint(0, max(1, case.seqlen_q)) if case.append else 0
        paged = config.family == "paged_cache"
        case.rows = rng.choice((1, 3, 8, 16, 64)) if paged else rng.randint(case.new_len, MAX_LEN)
        capacity = case.rows * max(rng.randint(1, -(-MAX_LEN // case.rows)), -(-case.new_len // case.rows)) \
            if paged else case.rows
        smallest = max(case.new_len, case.rows if paged else 1)
        while case.batch * per_row * case.seqlen_q * capacity > WORK and capacity > smallest:
            capacity = max(case.new_len, capacity // 2)
            capacity = case.rows * -(-capacity // case.rows) if paged else capacity
        if not paged:
            case.rows = capacity
            if rng.random() < 0.5:
                case.slots = rng.sample(range(case.batch + rng.randint(0, 2)), case.batch)
        case.seqlen_k = capacity  # the rows one sequence can hold
        case.whole_cache = not case.append and rng.random() < 0.2  # cache_seqlens=None
        case.lens_k = [capacity if case.whole_cache else draw_len(rng, zero=0.1, limit=capacity - case.new_len)
                       for _ in range(case.batch)]
        if not paged and rng.random() < 0.5:
            case.leftpad = [rng.randint(0, n) for n in case.lens_k]
        case.seqlens_as_int = not case.whole_cache and len(set(case.lens_k)) == 1 and rng.random() < 0.5
        case.num_splits = rng.choice((0, 0, 1, 2, 5))
    return case


CONFIG_LIST = draw_configs(SEED)
ALL_CASES = [draw_case(i, CONFIG_LIST) for i in range(CASES)]


# Inputs: every tensor may be a strided view of a larger buffer (last dim contiguous, as the API requires).

View = Callable[[torch.Tensor], torch.Tensor]


def placed(x: torch.Tensor, rng: random.Random, strided: bool) -> tuple[torch.Tensor, View]:
    """(buffer, view): view(buffer) holds x's values. Strided: the buffer has x's leading dims in a random order,
    each padded with noise, and a wider last dim; otherwise the buffer is x and view the identity."""
    if not strided:
        return x.clone(), lambda t: t
    lead = list(range(x.dim() - 1))
    order = rng.sample(lead, len(lead))
    pad = [rng.choice((0, 1, 3)) for _ in range(x.dim())]
    shape = [x.shape[i] + pad[i] for i in order] + [x.shape[-1] + pad[-1]]
    inverse = [order.index(i) for i in lead] + [x.dim() - 1]
    sizes = tuple(slice(0, n) for n in x.shape)

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.permute(inverse)[sizes]

    buffer = torch.randn(shape).to(x.dtype)
    view(buffer).copy_(x)
    return buffer, view


def values(shape: tuple[int, ...], dtype: torch.dtype, magnitude: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape) * magnitude).to(dtype)


def slopes_of(case: Case, batch: int) -> torch.Tensor | None:
    if not case.alibi:
        return None
    shape = (case.nheads,) if case.alibi == "h" else (batch, case.nheads)
    return torch.rand(shape) * random.Random(case.index).choice((0.05, 0.5, 2.0))


def sequence_slopes(slopes: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if slopes is None else slopes if slopes.dim() == 1 else slopes[b]


# The oracle and the baseline: dense_attention per sequence, in float64 or in the inputs' dtype.

def attend_sequences(case: Case, seqlen_k: int, pieces, slopes, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """dense_attention of each sequence's (q, k, v), in `dtype`; `seqlen_k`: the call's (see call_window)."""
    opts = dict(scale=case.scale, causal=case.causal, window=call_window(case.window, seqlen_k), softcap=case.softcap,
                dtype=dtype)
    return [dense_attention(q, k, v, alibi=sequence_slopes(slopes, b), **opts) for b, (q, k, v) in enumerate(pieces)]


def padded_expected(case, q, k, v, slopes, dtype):
    results = attend_sequences(case, k.shape[1], list(zip(q, k, v)), slopes, dtype)
    if not results:
        return q.new_zeros(q.shape).to(dtype), torch.zeros(0, case.nheads, q.shape[1], dtype=torch.float64)
    return torch.stack([o for o, _ in results]), torch.stack([l for _, l in results])


def varlen_expected(case, q, k, v, slopes, dtype):
    cu_q, cu_k = offsets(case.lens_q), offsets(case.lens_k)
    pieces = [(q[cu_q[b] : cu_q[b + 1]], k[cu_k[b] : cu_k[b + 1]], v[cu_k[b] : cu_k[b + 1]])
              for b in range(len(case.lens_q))]
    results = attend_sequences(case, max(case.lens_k) + case.bound_extra, pieces, slopes, dtype)
    return torch.cat([o for o, _ in results]), torch.cat([l for _, l in results], dim=1)


def offsets(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths) + 1)]


# The tolerance rule.

def assert_within(name: str, ours: torch.Tensor, truth: torch.Tensor, base: torch.Tensor, factor: float,
                  slack: float, case: Case) -> None:
    assert ours.shape == truth.shape, \
        f"{name}: shape {tuple(ours.shape)}, expected {tuple(truth.shape)}; {case.describe()}"
    if not truth.numel():
        return
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    base_err = (base.double() - truth).abs().max().item()
    bound = factor * base_err + slack * max(1.0, truth.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} (plain PyTorch: {base_err:.3e}); {case.describe()}"


def assert_lse(lse: torch.Tensor, truth: torch.Tensor, base: torch.Tensor, case: Case) -> None:
    assert lse.dtype == torch.float32 and lse.shape == truth.shape, \
        f"lse {lse.dtype} {tuple(lse.shape)}; {case.describe()}"
    finite = torch.isfinite(truth)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(truth)) and torch.isfinite(lse[finite]).all(), \
        f"lse must be +inf exactly on the rows without keys; {case.describe()}"
    assert_within("lse", lse[finite], truth[finite], base[finite], 2, 1e-5, case)


FORWARD_SLACK = 1e-5  # relative to the largest output: fp32's rounding over a few hundred keys
GRAD_SLACK = 1e-4  # the backward kernels' slack of tests/test_backward_kernels.py


# Running a case.

BACKENDS = ("emulator", "reference")  # the kernels (strict: no fallback) and the PyTorch reference


def run_attention(case: Case, monkeypatch) -> None:
    rng = random.Random(f"{SEED}-{case.index}-tensors")
    torch.manual_seed(rng.randrange(2**31))
    dtype = case.config.dtype
    h, hk, d, m = case.nheads, case.nheads_k, case.head_dim, case.magnitude
    varlen = case.config.family == "varlen"
    if varlen:
        tq, tk = sum(case.lens_q), sum(case.lens_k)
        shapes = {"varlen": [(tq, h, d), (tk, hk, d), (tk, hk, d)], "varlen_kvpacked": [(tq, h, d), (tk, 2, hk, d)],
                  "varlen_qkvpacked": [(tq, 3, h, d)]}[case.function]
        batch = len(case.lens_q)
    else:
        b, sq, sk = case.batch, case.seqlen_q, case.seqlen_k
        shapes = {"func": [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)],
                  "kvpacked": [(b, sq, h, d), (b, sk, 2, hk, d)], "qkvpacked": [(b, sq, 3, h, d)]}[case.function]
        batch = b
    tensors = [values(s, dtype, m if i < 2 else 1.0) for i, s in enumerate(shapes)]  # q and k (or packed) scaled
    placements = [placed(t, rng, case.strided) for t in tensors]
    slopes = slopes_of(case, batch)

    def logical(buffers):
        """q, k, v of the call from its (possibly packed) argument tensors."""
        args = [view(t) for t, (_, view) in zip(buffers, placements)]
        axis = 1 if varlen else 2
        if len(args) == 3:
            return args
        if len(args) == 2:
            return [args[0], *args[1].unbind(axis)]
        return list(args[0].unbind(axis))

    def call(buffers):
        args = [view(t) for t, (_, view) in zip(buffers, placements)]
        opts = dict(softmax_scale=case.scale, causal=case.causal, window_size=case.window, softcap=case.softcap,
                    alibi_slopes=slopes, return_attn_probs=True)
        if varlen:
            cu_q = torch.tensor(offsets(case.lens_q), dtype=torch.int32)
            cu_k = torch.tensor(offsets(case.lens_k), dtype=torch.int32)
            bound_q, bound_k = max(case.lens_q) + case.bound_extra, max(case.lens_k) + case.bound_extra
            if case.function == "varlen":
                return flash_attn_varlen_func(*args, cu_q, cu_k, bound_q, bound_k, **opts)
            if case.function == "varlen_kvpacked":
                return flash_attn_varlen_kvpacked_func(*args, cu_q, cu_k, bound_q, bound_k, **opts)
            return flash_attn_varlen_qkvpacked_func(*args, cu_q, bound_q, **opts)
        return {"func": flash_attn_func, "kvpacked": flash_attn_kvpacked_func,
                "qkvpacked": flash_attn_qkvpacked_func}[case.function](*args, **opts)

    expected = varlen_expected if varlen else padded_expected
    buffers = [buffer for buffer, _ in placements]
    truth_leaves = [t.double().requires_grad_(case.backward) for t in buffers]
    base_leaves = [t.clone().requires_grad_(case.backward) for t in buffers]
    truth, truth_lse = expected(case, *logical(truth_leaves), slopes, torch.float64)
    base, base_lse = expected(case, *logical(base_leaves), slopes, dtype)
    dout = values(truth.shape, dtype)
    exact = plain = (None,) * len(buffers)
    if case.backward and truth.requires_grad:  # (an empty batch has no gradient anywhere)
        exact = torch.autograd.grad(truth, truth_leaves, dout.double(), allow_unused=True)
        plain = torch.autograd.grad(base, base_leaves, dout, allow_unused=True)

    for backend in BACKENDS:
        monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", backend)
        leaves = [buffer.clone().requires_grad_(case.backward) for buffer in buffers]
        out, lse, _ = call(leaves)
        assert all(torch.equal(a, b) for a, b in zip(leaves, buffers)), f"an input was modified; {case.describe()}"
        assert out.dtype == dtype, f"out is {out.dtype}; {case.describe()}"
        assert_within(f"out ({backend})", out, truth, base, 2, FORWARD_SLACK, case)
        assert_lse(lse, truth_lse, base_lse, case)
        if not case.backward:
            continue
        ours = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        for i, (g, t, p) in enumerate(zip(ours, exact, plain)):
            zeros = torch.zeros_like(leaves[i])
            g, t, p = (zeros if x is None else x for x in (g, t, p))
            assert torch.isfinite(g).all(), f"grad of argument {i} ({backend}) is not finite; {case.describe()}"
            assert_within(f"grad of argument {i} ({backend})", g, t, p, 3, GRAD_SLACK, case)


def run_cache(case: Case, monkeypatch) -> None:
    rng = random.Random(f"{SEED}-{case.index}-tensors")
    torch.manual_seed(rng.randrange(2**31))
    dtype = case.config.dtype
    b, h, hk, d = case.batch, case.nheads, case.nheads_k, case.head_dim
    paged = case.config.family == "paged_cache"
    if paged:
        per_sequence = case.seqlen_k // case.rows
        blocks = b * per_sequence + rng.randint(0, 2)
        table = torch.tensor(rng.sample(range(blocks), b * per_sequence), dtype=torch.int32).reshape(b, per_sequence)
        cache_shape = (blocks, case.rows, hk, d)
    else:
        table = None
        cache_shape = (max(case.slots, default=b - 1) + 1 + rng.randint(0, 1), case.seqlen_k, hk, d)
    q = values((b, case.seqlen_q, h, d), dtype, case.magnitude)
    caches = [values(cache_shape, dtype, case.magnitude if i == 0 else 1.0) for i in range(2)]
    new = [values((b, case.new_len, hk, d), dtype, case.magnitude if i == 0 else 1.0) if case.append else None
           for i in range(2)]
    placements = [placed(t, rng, case.strided) for t in (q, *caches)]
    slopes = slopes_of(case, b)
    slots = torch.tensor(case.slots, dtype=torch.int32) if case.slots else None
    leftpad = torch.tensor(case.leftpad, dtype=torch.int32) if case.leftpad else None
    lens = case.lens_k
    seqlens = None if case.whole_cache else lens[0] if case.seqlens_as_int else torch.tensor(lens, dtype=torch.int32)

    def logical_rows(seq: int, rows: range) -> tuple:
        """Index of a sequence's logical cache rows in the cache tensor."""
        r = torch.tensor(list(rows), dtype=torch.long)
        if paged:
            return table[seq].long()[r // case.rows], r % case.rows
        return torch.full_like(r, case.slots[seq] if case.slots else seq), r

    expected_caches = [c.clone() for c in caches]
    for seq in range(b) if case.append else ():
        at = logical_rows(seq, range(lens[seq], lens[seq] + case.new_len))
        for cache, rows in zip(expected_caches, new):
            cache[at] = rows[seq]
    buffers = [buffer for buffer, _ in placements]
    expected_buffers = [buffer.clone() for buffer in buffers]
    for buffer, (_, view), cache in zip(expected_buffers[1:], placements[1:], expected_caches):
        view(buffer).copy_(cache)
    pieces = []
    for seq in range(b):
        start = case.leftpad[seq] if case.leftpad else 0
        at = logical_rows(seq, range(start, lens[seq] + case.new_len))
        pieces.append((q[seq], expected_caches[0][at], expected_caches[1][at]))
    truth = attend_sequences(case, case.seqlen_k, pieces, slopes, torch.float64)
    base = attend_sequences(case, case.seqlen_k, pieces, slopes, dtype)

    for backend in BACKENDS:
        monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", backend)
        arguments = [buffer.clone() for buffer in buffers]
        views = [view(t) for t, (_, view) in zip(arguments, placements)]
        out, lse = flash_attn_with_kvcache(views[0], views[1], views[2], new[0], new[1], cache_seqlens=seqlens,
                                           cache_batch_idx=slots, cache_leftpad=leftpad, block_table=table,
                                           softmax_scale=case.scale, causal=case.causal, window_size=case.window,
                                           softcap=case.softcap, alibi_slopes=slopes, num_splits=case.num_splits,
                                           return_softmax_lse=True)
        for name, got, want in zip(("q", "k_cache", "v_cache"), arguments, expected_buffers):
            assert torch.equal(got, want), f"{name} is not as the append leaves it ({backend}); {case.describe()}"
        assert out.dtype == dtype, f"out is {out.dtype}; {case.describe()}"
        assert_within(f"out ({backend})", out, torch.stack([o for o, _ in truth]), torch.stack([o for o, _ in base]),
                      2, FORWARD_SLACK, case)
        assert_lse(lse, torch.stack([l for _, l in truth]), torch.stack([l for _, l in base]), case)


@pytest.mark.parametrize("case", ALL_CASES, ids=[f"{c.index}-{c.function}-{str(c.config.dtype)[6:]}-d{c.head_dim}"
                                                 for c in ALL_CASES])
def test_fuzz_case_matches_float64_attention(case: Case, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    with torch.random.fork_rng():
        (run_cache if case.config.family.endswith("cache") else run_attention)(case, monkeypatch)
