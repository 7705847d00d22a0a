"""Edge cases an adversarial pass found (issue 17), each with its must-pass twin: sequence bounds no real call
has, launches too large for Metal, windows beyond int64 or the sequence, rotary under such a window, empty
queries over many key blocks, hugely negative scores, large-score gradients, and varlen rows past the last
sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import (
    ArgumentError,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)
from flash_attn_metal.kernels import dispatch
from flash_attn_metal.problem import AttentionProblem
from flash_attn_metal.reference import attention_ref
from flash_attn_metal.runtime import backend as runtime_backend
from naive import dense_attention

pytestmark = pytest.mark.usefixtures("emulator_strict")


@pytest.fixture
def grids(monkeypatch):
    """Every launch's (kernel name, threads), in order."""
    seen: list[tuple[str, list[int]]] = []
    launch = runtime_backend.Kernel.__call__

    def recording(self, *args, threads=None, group_size=None):
        seen.append((self.name, list(threads)))
        return launch(self, *args, threads=threads, group_size=group_size)

    monkeypatch.setattr(runtime_backend.Kernel, "__call__", recording)
    return seen


def varlen_call(max_seqlen, lengths=(4, 6), backward=True, grids=None):
    """A varlen call over `lengths` with the bound max_seqlen; (out, dq, dk, dv) and the grids it launched."""
    torch.manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 32, requires_grad=backward) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    first = len(grids) if grids is not None else 0
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
    result = [out]
    if backward:
        result += torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return result, (grids[first:] if grids is not None else None)


# Item 1 and 2: the grids come from the real lengths; values no call can have are refused.

@pytest.mark.parametrize("bound", [2**31, 2**32 + 8, -1])
def test_max_seqlen_outside_flash_attns_int_is_refused(bound):
    varlen_call(2**31 - 1, backward=False)  # the largest bound that fits runs
    with pytest.raises(ArgumentError, match=r"max_seqlen_q must be between 0 and 2\*\*31 - 1"):
        varlen_call(bound, backward=False)


@pytest.mark.parametrize("bound", [2**30 + 16, 10**8])
def test_a_loose_max_seqlen_launches_what_the_real_lengths_need(grids, bound):
    """A bound of 2**30 + 16 once wrapped the grid (SIGSEGV); 1e8 made 10 tokens take a minute. Both now launch
    exactly what the tightest bound launches, and give bit-identical results."""
    exact, exact_grids = varlen_call(6, grids=grids)
    loose, loose_grids = varlen_call(bound, grids=grids)
    assert loose_grids == exact_grids
    assert all(torch.equal(a, b) for a, b in zip(loose, exact))
    _, longer_grids = varlen_call(300, lengths=(4, 300), grids=grids)
    assert longer_grids != exact_grids  # twin: longer real sequences do launch more


def test_the_launcher_refuses_a_grid_that_does_not_fit_uint32():
    """Below validation: a problem whose grid would wrap Metal's uint32 positions is refused at launch, for every
    backend (runtime/backend.py), instead of wrapping."""
    q = torch.randn(10, 2, 32)
    cu = torch.tensor([0, 10], dtype=torch.int32)

    def problem(max_seqlen):
        return AttentionProblem(q=q, k=q, v=q, softmax_scale=0.2, causal=False, window_left=-1, window_right=-1,
                                softcap=0.0, alibi_slopes=None, dropout_p=0.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                max_seqlen_q=max_seqlen, max_seqlen_k=10)

    out = dispatch.forward(problem(10), "emulator")[0]
    assert torch.allclose(out, attention_ref(q[None], q[None], q[None], softmax_scale=0.2)[0][0], atol=1e-5)
    with pytest.raises(ValueError, match=r"threads \[\d+, 2, 1\] has a dimension outside 0\.\.4294967295"):
        dispatch.forward(problem(2**31), "emulator")


def test_every_backend_refuses_launch_dimensions_beyond_uint32():
    """The check sits in Kernel.__call__, which every backend's launches go through, before the backend sees them."""
    launched = []

    class Compiled:
        def __getattr__(self, name):
            return lambda *args, threads=None, group_size=None: launched.append((threads, group_size))

    library = runtime_backend.Backend("fake", lambda source: Compiled()).compile("kernel void k() {}")
    library.k(threads=[2**32 - 1, 1, 1], group_size=[1024, 1, 1])
    assert launched == [([2**32 - 1, 1, 1], [1024, 1, 1])]
    for bad in (dict(threads=[2**32, 1, 1], group_size=[64, 1, 1]), dict(threads=2**40, group_size=64),
                dict(threads=[64, 1, 1], group_size=[2**32, 1, 1]), dict(threads=[-1], group_size=[1])):
        with pytest.raises(ValueError, match=r"outside 0\.\.4294967295"):
            library.k(**bad)
    assert len(launched) == 1


# Item 9: windows beyond int64 are refused; windows as long as the keys are no window.

@pytest.mark.parametrize("window", [(2**64 + 1, 2**64 + 1), (-(2**63), 0), (0, 2**63)])
def test_windows_outside_int64_are_refused(window):
    q = torch.randn(1, 6, 2, 16)
    huge = flash_attn_func(q, q, q, window_size=(2**63 - 1, 2**63 - 1))
    assert torch.equal(huge, flash_attn_func(q, q, q))  # twin: the largest window is no window
    with pytest.raises(ArgumentError, match="window_size entries must be between -1"):
        flash_attn_func(q, q, q, window_size=window)


@pytest.mark.parametrize("backend", ["emulator", "reference"])
def test_a_window_side_as_long_as_the_keys_is_unbounded(monkeypatch, backend):
    """flash-attn normalises a side >= seqlen_k to -1. It matters on the right when queries outnumber keys:
    with 10 queries over 4 keys, window right 4 is unbounded, while 3 masks the first rows completely."""
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", backend)
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 10, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    unbounded = flash_attn_func(q, k, v)
    assert torch.equal(flash_attn_func(q, k, v, window_size=(4, 4)), unbounded)
    shorter, lse, _ = flash_attn_func(q, k, v, window_size=(3, 3), return_attn_probs=True)
    expected, expected_lse = dense_attention(q[0], k[0], v[0], window=(3, 3))
    assert torch.allclose(shorter[0].double(), expected, atol=1e-5) and torch.isinf(lse[0, :, 0]).all()
    # varlen compares the window with max_seqlen_k, as flash-attn does
    cu_q, cu_k = torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32)
    as_varlen = lambda bound: flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 10, bound,  # noqa: E731
                                                     window_size=(5, 5))
    assert torch.equal(as_varlen(5), unbounded[0])
    assert torch.allclose(as_varlen(6).double(), dense_attention(q[0], k[0], v[0], window=(5, 5))[0], atol=1e-5)


# Item 10: rotary in flash_attn_with_kvcache follows upstream's window normalisation.

def test_kvcache_rotary_treats_a_window_covering_the_cache_as_no_window(monkeypatch):
    """Upstream: a window at least the cache's length is no window, and with no window (and no causal mask) every
    query is rotated at cache_seqlens. One row shorter, the window is real and queries rotate per token."""
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")  # the rotation is PyTorch on every backend
    torch.manual_seed(2)
    cache_rows = 12
    cos, sin = torch.randn(cache_rows, 8), torch.randn(cache_rows, 8)

    def call(window):
        q = torch.randn(1, 3, 2, 16, generator=torch.Generator().manual_seed(3))
        caches = [torch.randn(1, cache_rows, 2, 16, generator=torch.Generator().manual_seed(i)) for i in (4, 5)]
        new = [torch.randn(1, 2, 2, 16, generator=torch.Generator().manual_seed(i)) for i in (6, 7)]
        return flash_attn_with_kvcache(q, *caches, *new, cos, sin, cache_seqlens=4, window_size=window)

    no_window = call((-1, -1))
    assert torch.equal(call((cache_rows, cache_rows)), no_window)
    assert torch.equal(call((2**40, 2**40)), no_window)
    assert not torch.allclose(call((cache_rows - 1, cache_rows - 1)), no_window, atol=1e-3)


# Item 11: no queries over many key blocks returns an empty result (split-KV has nothing to split).

def empty_query_calls():
    keys = torch.randn(1, 600, 2, 32)  # 10 key blocks of 64 and more: enough to split
    varlen_keys = torch.randn(1200, 2, 32)
    cu_k = torch.tensor([0, 600, 1200], dtype=torch.int32)
    empty_cu = torch.zeros(3, dtype=torch.int32)
    return {
        "seqlen_q 0": lambda rows: flash_attn_func(torch.randn(1, rows, 2, 32), keys, keys),
        "batch 0": lambda rows: flash_attn_func(torch.randn(1 if rows else 0, 3, 2, 32), keys[:1 if rows else 0],
                                                keys[:1 if rows else 0]),
        "varlen, every query empty": lambda rows: flash_attn_varlen_func(
            torch.randn(2 * rows, 2, 32), varlen_keys, varlen_keys,
            torch.tensor([0, rows, 2 * rows], dtype=torch.int32) if rows else empty_cu, cu_k, rows, 600),
        "kv cache": lambda rows: flash_attn_with_kvcache(torch.randn(1, rows, 2, 32), keys, keys, num_splits=4),
        "kv cache, chosen splits": lambda rows: flash_attn_with_kvcache(torch.randn(1, rows, 2, 32), keys, keys),
    }


@pytest.mark.parametrize("name", list(empty_query_calls()))
def test_no_queries_over_many_key_blocks_give_an_empty_result(name):
    call = empty_query_calls()[name]
    flash_attn_metal.reset_stats()
    assert call(1).numel()  # twin: one query row runs the kernels (split-KV where chosen)
    assert flash_attn_metal.stats()["launches"]
    out = call(0)
    assert out.numel() == 0 and out.dtype == torch.float32


# Item 6: a row whose real scores are all hugely negative is not a masked row.

def hugely_negative(scale: float):
    """Scores about -scale**2 * 4 in every row: q all +scale, k all -scale, random v."""
    torch.manual_seed(4)
    q = torch.full((1, 3, 2, 4), scale)
    k = torch.full((1, 5, 2, 4), -scale)
    return q, k, torch.randn(1, 5, 2, 4)


def huge_alibi():
    """Slopes of 1e36: the first query rows lie 2 and more keys away from every key (10 queries, 4 keys,
    bottom-right alignment), so all their scores are about -2e36 and below."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 10, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    return q, k, v, torch.full((2,), 1e36)


def check_hugely_negative(out, lse, q, k, v, slopes=None):
    expected, expected_lse = dense_attention(q[0], k[0], v[0], alibi=slopes)
    assert torch.isfinite(lse).all(), "a row with keys must have a finite lse"
    assert torch.allclose(out[0].double(), expected, atol=1e-5)
    assert torch.allclose(lse[0].double(), expected_lse, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e16, 4e15])  # scores about -4e32 and -6.4e31: below the old -1e30 sentinel
def test_the_reference_weighs_hugely_negative_scores(monkeypatch, scale):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    q, k, v = hugely_negative(scale)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.allclose(out[0], v[0].mean(0).expand(3, 2, 4), atol=1e-6)  # all scores equal: the mean of v
    check_hugely_negative(out, lse, q, k, v)
    masked, masked_lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(0, 0), return_attn_probs=True)
    q_short = torch.randn(1, 7, 2, 4)
    rows, rows_lse, _ = flash_attn_func(q_short, k, v, causal=True, return_attn_probs=True)
    assert (rows[0, :2] == 0).all() and torch.isposinf(rows_lse[0, :, :2]).all()  # twin: masked rows stay masked


def test_the_reference_weighs_rows_that_huge_alibi_slopes_push_down(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    q, k, v, slopes = huge_alibi()
    out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True)
    assert torch.allclose(out[0, 0], v[0, 0], atol=1e-6)  # the nearest key takes all the weight
    check_hugely_negative(out, lse, q, k, v, slopes)


@pytest.mark.parametrize("scale", [1e16, 4e15])
def test_the_kernels_weigh_hugely_negative_scores(scale):
    q, k, v = hugely_negative(scale)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    check_hugely_negative(out, lse, q, k, v)


def test_the_kernels_weigh_rows_that_huge_alibi_slopes_push_down():
    q, k, v, slopes = huge_alibi()
    out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True)
    check_hugely_negative(out, lse, q, k, v, slopes)


def test_the_kernels_weigh_moderately_negative_scores():
    """Twin of the two above, at scores of about -400."""
    q, k, v = hugely_negative(10.0)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    check_hugely_negative(out, lse, q, k, v)


# Item 7: gradients at large scores (fp32, d = 32, |q| and |k| scaled up) within a few times fp32 PyTorch's error.

def large_score_gradients(scale: float):
    """dq, dk, dv of the kernels, of plain fp32 PyTorch (the reference) and of float64, for q and k drawn from
    scale * N(0, 1)."""
    torch.manual_seed(6)
    q, k = torch.randn(1, 100, 2, 32) * scale, torch.randn(1, 100, 2, 32) * scale
    v, dout = torch.randn(1, 100, 2, 32), torch.randn(1, 100, 2, 32)

    def grads(attend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(attend(*leaves), leaves, dout.to(dtype))

    exact = grads(lambda *t: dense_attention(*(x[0] for x in t))[0][None], torch.float64)
    plain = grads(lambda *t: attention_ref(*t)[0], torch.float32)
    ours = grads(flash_attn_func, torch.float32)
    return ours, plain, exact


def check_large_score_gradients(scale: float, factor: float) -> None:
    ours, plain, exact = large_score_gradients(scale)
    for name, g, p, e in zip(("dq", "dk", "dv"), ours, plain, exact):
        assert torch.isfinite(g).all(), name
        err, plain_err = (g.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        bound = factor * plain_err + 1e-6 * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} ({factor}x fp32 PyTorch's {plain_err:.3e})"


@pytest.mark.parametrize("scale, factor", [(100.0, 10), (1000.0, 100)])
def test_gradients_at_large_scores_stay_near_fp32_pytorch(scale, factor):
    check_large_score_gradients(scale, factor)


def test_gradients_at_ordinary_scores_stay_near_fp32_pytorch():
    """Twin of the test above, at ordinary scores."""
    check_large_score_gradients(1.0, 10)


# Item 8: varlen rows past cu_seqlens[-1] belong to no sequence: out 0, lse +inf, zero gradients.

PAST_THE_END = {"some rows": ([0, 3, 7], [0, 5, 9], 10, 12), "every row": ([0, 0, 0], [0, 5, 9], 4, 12)}


def past_the_end(cu_q, cu_k, total_q, total_k):
    """(out, lse, dq, dk, dv, q rows used, k rows used), with fresh allocations filled with NaN (as freed memory
    may hold), so an output the kernels never write shows."""
    torch.manual_seed(7)
    q = torch.randn(total_q, 2, 16, requires_grad=True)
    k, v = (torch.randn(total_k, 2, 16, requires_grad=True) for _ in range(2))
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # with fill_uninitialized_memory: torch.empty gives NaN
    try:
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 5, return_attn_probs=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return out, lse, *grads, int(cu_q[-1]), int(cu_k[-1])


def check_past_the_end(name):
    out, lse, dq, dk, dv, used_q, used_k = past_the_end(*PAST_THE_END[name])
    assert (out[used_q:] == 0).all() and torch.isposinf(lse[:, used_q:]).all()
    assert (dq[used_q:] == 0).all() and (dk[used_k:] == 0).all() and (dv[used_k:] == 0).all()
    return out, lse, dq, dk, dv, used_q, used_k


@pytest.mark.parametrize("name", list(PAST_THE_END))
def test_the_reference_zeroes_rows_past_the_last_sequence(monkeypatch, name):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    check_past_the_end(name)


@pytest.mark.parametrize("name", list(PAST_THE_END))
def test_the_kernels_zero_rows_past_the_last_sequence(name):
    check_past_the_end(name)


def test_the_kernels_agree_with_the_reference_inside_the_sequences(monkeypatch):
    """Twin of the test above: the rows that belong to a sequence are right today."""
    out, lse, dq, dk, dv, used_q, used_k = past_the_end(*PAST_THE_END["some rows"])
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    expected = past_the_end(*PAST_THE_END["some rows"])
    for name, ours, ref, used in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), expected,
                                     (used_q, used_q, used_q, used_k, used_k)):
        inside = ours[:, :used] if name == "lse" else ours[:used]
        assert torch.allclose(inside, ref[:, :used] if name == "lse" else ref[:used], atol=1e-5), name
    assert math.isfinite(float(lse[:, :used_q].max()))
