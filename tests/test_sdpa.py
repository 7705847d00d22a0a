"""flash_attn_metal.scaled_dot_product_attention against torch's F.scaled_dot_product_attention in float64, forward
and backward, under the upstream rule (tests/test_forward_kernels.py): |ours - float64 torch| <= 2x (3x for
gradients) |plain low-precision PyTorch - float64 torch| + slack, where plain low-precision PyTorch is torch's math
path computing in the inputs' dtype (no fp32 upcast), in three modes:

- "kernels": the emulator in strict mode (a fallback fails the test): masks, sinks and top-left causal run there;
- "reference": FLASH_ATTN_METAL_BACKEND=reference, which runs the same AttentionProblem on the pure-PyTorch
  reference: the Python layer (views, broadcasts, masks, alignment, GQA) checked today;
- "fallback": the emulator without strict mode: every case here runs on the kernels, without a warning.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import flash_attn_metal
from flash_attn_metal import routing, scaled_dot_product_attention
from flash_attn_metal.sdpa import TORCH, plan

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("kernels", "reference", "fallback")
SLACK = {"out": 1e-5, "grad": 1e-4}


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(routing, "_warned", set())  # each reason warns once per process
    flash_attn_metal.reset_stats()


def set_mode(monkeypatch, mode: str) -> None:
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference" if mode == "reference" else "emulator")
    if mode == "kernels":
        monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    else:
        monkeypatch.delenv("FLASH_ATTN_METAL_STRICT", raising=False)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    E: int
    L: int
    S: int
    H: int = 4
    Hk: int = 4
    causal: bool = False
    mask: str = ""  # "bool" or "float" and a shape name from MASK_SHAPES
    gqa: bool = False
    Ev: int = 0  # 0: E
    layout: str = "blhe"  # "blhe": (B, H, L, E) views of (B, L, H, E) tensors; "bhle": contiguous (B, H, L, E)
    B: int = 2

    def __str__(self) -> str:
        parts = [self.dtype, f"E{self.E}" + (f"-Ev{self.Ev}" if self.Ev else ""), f"{self.L}x{self.S}",
                 f"h{self.H}/{self.Hk}", self.layout]
        parts += [name for name, on in (("causal", self.causal), ("gqa", self.gqa)) if on]
        return "-".join(parts + ([self.mask.replace(" ", "")] if self.mask else []))


MASK_SHAPES = {"(L, S)": lambda c: (c.L, c.S), "(B, 1, 1, S)": lambda c: (c.B, 1, 1, c.S),
               "(1, H, L, S)": lambda c: (1, c.H, c.L, c.S), "(B, H, L, S)": lambda c: (c.B, c.H, c.L, c.S)}

# Three dtypes over three kernel specs (fp16/64, bf16/64, fp32/32), so the emulator compiles few variants.
CASES = [
    Case("fp16", 64, 40, 40), Case("bf16", 64, 33, 57), Case("fp32", 32, 57, 33, layout="bhle"),
    # is_causal: top-left; L == S is the same mask as flash-attn's bottom-right
    Case("fp16", 64, 40, 40, causal=True), Case("bf16", 64, 33, 57, causal=True), Case("fp32", 32, 57, 33, causal=True),
    # enable_gqa and MQA; a value head dim other than the query's
    Case("fp16", 64, 40, 40, Hk=2, gqa=True, causal=True), Case("bf16", 64, 20, 30, H=8, Hk=1, gqa=True),
    Case("fp16", 64, 30, 45, Ev=40), Case("fp32", 16, 30, 45, Ev=32),
    # masks of every broadcast shape, bool and float, with fully masked rows
    *(Case(dtype, E, 24, 40, mask=f"{kind} {shape}")
      for (dtype, E), (kind, shape) in zip([("fp16", 64), ("bf16", 64), ("fp32", 32)] * 3,
                                           [(k, s) for k in ("bool", "float") for s in MASK_SHAPES])),
    Case("fp16", 64, 40, 24, Hk=2, gqa=True, mask="bool (B, H, L, S)", layout="bhle"),
]


def grid():
    return [pytest.param(case, mode, id=f"{case}-{mode}") for case in CASES for mode in MODES]


def make_inputs(case: Case, seed: int):
    """Leaves (B, L, H, E) or (B, H, L, E), the (B, H, L, E) tensors SDPA takes, and the mask."""
    torch.manual_seed(seed)
    dtype = DTYPES[case.dtype]
    leaves, views = [], []
    for n, h, d in ((case.L, case.H, case.E), (case.S, case.Hk, case.E), (case.S, case.Hk, case.Ev or case.E)):
        if case.layout == "blhe":
            leaf = torch.randn(case.B, n, h, d, dtype=dtype, requires_grad=True)
            views.append(leaf.transpose(1, 2))
        else:
            leaf = torch.randn(case.B, h, n, d, dtype=dtype, requires_grad=True)
            views.append(leaf)
        leaves.append(leaf)
    mask = None
    if case.mask:
        kind, shape = case.mask.split(" ", 1)
        shape = MASK_SHAPES[shape](case)
        keep = torch.rand(shape) > 0.3
        if shape[-2] > 1:
            keep[(0,) * (len(shape) - 2) + (1,)] = False  # a fully masked query row
        mask = keep if kind == "bool" else torch.randn(shape).masked_fill(~keep, -math.inf)
    return leaves, views, mask


def call_kwargs(case: Case, mask):
    return dict(attn_mask=mask, is_causal=case.causal, enable_gqa=case.gqa)


def low_precision_torch(q, k, v, **kwargs) -> torch.Tensor:
    """torch's math path in the inputs' own dtype: the "plain low-precision PyTorch" of the rule."""
    upcasting = not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(not upcasting)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(ours, truth, baseline, kind: str, name: str) -> None:
    err = max_error(ours, truth)
    if ours.dtype == torch.float32:
        bound = SLACK[kind] * max(1.0, truth.abs().max().item())
    else:
        bound = (2 if kind == "out" else 3) * max_error(baseline, truth) + SLACK[kind]
    assert torch.isfinite(ours).all(), name
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e}"


@pytest.mark.parametrize("case, mode", grid())
def test_sdpa_matches_torch_in_float64(case: Case, mode: str, monkeypatch):
    set_mode(monkeypatch, mode)
    leaves, (q, k, v), mask = make_inputs(case, seed=hash(str(case)) % 1000)
    kwargs = call_kwargs(case, mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = scaled_dot_product_attention(q, k, v, **kwargs)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)

    doubles = [t.detach().double().requires_grad_() for t in leaves]
    views64 = [t.transpose(1, 2) for t in doubles] if case.layout == "blhe" else doubles
    mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    truth = F.scaled_dot_product_attention(*views64, **call_kwargs(case, mask64))
    truths = torch.autograd.grad(truth, doubles, grad.double())

    lows = [t.detach().requires_grad_() for t in leaves]
    baseline = low_precision_torch(*([t.transpose(1, 2) for t in lows] if case.layout == "blhe" else lows), **kwargs)
    baselines = torch.autograd.grad(baseline, lows, grad)

    assert out.shape == truth.shape and out.dtype == q.dtype
    assert_within_rule(out, truth, baseline, "out", "out")
    for name, g, t, b in zip(("dq", "dk", "dv"), ours, truths, baselines):
        assert_within_rule(g, t, b, "grad", name)
    counts = flash_attn_metal.stats()
    if mode == "reference":
        assert not counts["launches"] and not counts["fallbacks"] and not caught
    else:
        assert counts["launches"] and not counts["fallbacks"]


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_rows_give_what_torchs_math_path_gives(mode, monkeypatch):
    """torch 2.13's math path (what MPS runs) gives out = 0 and zero gradients for a row whose scores are all -inf,
    from a bool or a float mask."""
    set_mode(monkeypatch, mode)
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 32, requires_grad=True) for _ in range(3))
    keep = torch.rand(5, 7) > 0.5
    keep[0] = True
    keep[2] = False
    keep[4] = False
    for mask in (keep, torch.zeros(5, 7).masked_fill(~keep, -math.inf)):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            expected = F.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], attn_mask=mask[:, :5])
        expected_grads = torch.autograd.grad(expected.sum(), (q,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], attn_mask=mask[:, :5])
        (dq,) = torch.autograd.grad(out.sum(), (q,))
        assert (out[:, :, [2, 4]] == 0).all() and (dq[:, :, [2, 4]] == 0).all()
        assert (expected[:, :, [2, 4]] == 0).all() and (expected_grads[0][:, :, [2, 4]] == 0).all()
        assert torch.allclose(out, expected, atol=1e-5) and torch.allclose(dq, expected_grads[0], atol=1e-5)


def test_fully_masked_rows_on_the_kernels(monkeypatch):
    set_mode(monkeypatch, "kernels")
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[2] = False
    out = scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert (out[:, :, 2] == 0).all() and flash_attn_metal.stats()["launches"]


# Shapes torch's SDPA takes beyond (B, H, L, E): served by the kernels today (no mask, no top-left causal).
SHAPES = {
    "(H, L, E)": ((4, 9, 32), (4, 11, 32), (4, 11, 32), {}),
    "(L, E)": ((9, 32), (11, 32), (11, 32), {}),
    "(A, B, H, L, E)": ((2, 3, 2, 9, 32), (2, 3, 2, 11, 32), (2, 3, 2, 11, 32), {}),
    "key and value batch broadcast": ((3, 2, 9, 32), (1, 2, 11, 32), (1, 2, 11, 32), {}),
    "query batch broadcast (learned queries)": ((1, 2, 9, 32), (3, 2, 11, 32), (3, 2, 11, 32), {}),
    "query (L, E) against (B, H, S, E)": ((9, 32), (3, 2, 11, 32), (3, 2, 11, 32), {}),
    "key and value heads broadcast (MQA)": ((3, 4, 9, 32), (3, 1, 11, 32), (3, 1, 11, 32), {}),
    "query heads broadcast": ((3, 1, 9, 32), (3, 4, 11, 32), (3, 4, 11, 32), {}),
    "key heads broadcast, value not": ((3, 4, 9, 32), (3, 1, 11, 32), (3, 4, 11, 32), {}),
    "enable_gqa on (H, L, E)": ((6, 9, 32), (2, 11, 32), (2, 11, 32), dict(enable_gqa=True)),
    "no keys": ((2, 2, 9, 32), (2, 2, 0, 32), (2, 2, 0, 32), {}),
    "no queries": ((2, 2, 0, 32), (2, 2, 11, 32), (2, 2, 11, 32), {}),
    "empty batch": ((0, 2, 9, 32), (0, 2, 11, 32), (0, 2, 11, 32), {}),
    "causal, L == S": ((2, 2, 9, 32), (2, 2, 9, 32), (2, 2, 9, 32), dict(is_causal=True)),
    "scale": ((2, 2, 9, 32), (2, 2, 11, 32), (2, 2, 11, 32), dict(scale=0.3)),
    "negative scale": ((2, 2, 9, 32), (2, 2, 11, 32), (2, 2, 11, 32), dict(scale=-0.2)),
}


@pytest.mark.parametrize("name", SHAPES)
def test_torchs_other_shapes_on_the_kernels(name, monkeypatch):
    set_mode(monkeypatch, "kernels")
    *shapes, kwargs = SHAPES[name]
    torch.manual_seed(12)
    q, k, v = (torch.randn(s, requires_grad=True) for s in shapes)
    out = scaled_dot_product_attention(q, k, v, **kwargs)
    doubles = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*doubles, **kwargs)
    assert out.shape == expected.shape
    assert torch.allclose(out.double(), expected, atol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    expected_grads = torch.autograd.grad(expected, doubles, torch.ones_like(expected))
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g.double(), e, atol=1e-4)
    assert flash_attn_metal.stats()["launches"] or 0 in q.shape + k.shape


def test_views_and_broadcast_masks_are_read_in_place():
    """The problem holds views of the caller's tensors: no copy of q, k, v, and stride 0 for a broadcast mask."""
    torch.manual_seed(13)
    q, k, v = (torch.randn(2, 9, 4, 32).transpose(1, 2) for _ in range(3))
    k_one = torch.randn(1, 4, 11, 32)
    mask = torch.rand(2, 1, 1, 11) > 0.5
    served = plan(q, k_one, k_one, mask, 0.0, False, None, False, None)
    p = served.problem
    assert p.q.data_ptr() == q.data_ptr() and p.k.data_ptr() == k_one.data_ptr()
    assert p.k.stride(0) == 0  # key's batch of 1 broadcast
    assert p.attn_mask.data_ptr() == mask.data_ptr() and p.attn_mask.shape == (2, 4, 9, 11)
    assert p.attn_mask.stride()[1:3] == (0, 0)
    assert plan(q, k, v, None, 0.0, True, None, False, None).problem.top_left  # torch's is_causal
    narrower = plan(q, k, v[..., :16], None, 0.0, False, None, False, None)  # Ev < E: v is zero padded
    assert narrower.problem.v.shape[-1] == 32 and narrower.value_dim == 16


# Input torch rejects: ours raises the same exception type with the same message, in strict mode too.
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_INPUT = {
    "dtypes differ": lambda: ((_t(2, 4, 5, 8), _t(2, 4, 7, 8, dtype=torch.float16), _t(2, 4, 7, 8)), {}),
    "integer tensors": lambda: ((torch.ones(2, 4, 5, 8, dtype=torch.int32),) * 3, {}),
    "one dimension": lambda: ((_t(8), _t(7, 8), _t(7, 8)), {}),
    "head dims differ": lambda: ((_t(2, 4, 5, 8), _t(2, 4, 7, 9), _t(2, 4, 7, 8)), {}),
    "heads differ": lambda: ((_t(2, 4, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), {}),
    "enable_gqa with heads that do not divide": lambda: ((_t(2, 4, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                                                         dict(enable_gqa=True)),
    "integer mask": lambda: ((_t(2, 4, 5, 8),) + (_t(2, 4, 7, 8),) * 2, dict(attn_mask=torch.ones(5, 7).long())),
    "float64 mask": lambda: ((_t(2, 4, 5, 8),) + (_t(2, 4, 7, 8),) * 2, dict(attn_mask=_t(5, 7).double())),
    "mask of the wrong shape": lambda: ((_t(2, 4, 5, 8),) + (_t(2, 4, 7, 8),) * 2,
                                        dict(attn_mask=torch.ones(5, 8, dtype=torch.bool))),
    "dropout_p above 1": lambda: ((_t(2, 4, 5, 8),) * 3, dict(dropout_p=1.5)),
    "is_causal not a bool": lambda: ((_t(2, 4, 5, 8),) * 3, dict(is_causal=1)),
    "query not a tensor": lambda: (([[1.0]], _t(2, 4, 7, 8), _t(2, 4, 7, 8)), {}),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_raises_what_torch_raises(name, monkeypatch):
    set_mode(monkeypatch, "kernels")
    args, kwargs = BAD_INPUT[name]()
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        scaled_dot_product_attention(*args, **kwargs)
    assert str(ours.value) == str(theirs.value)
    assert flash_attn_metal.stats()["fallbacks"] == {}  # bad input is no fallback


# Valid calls the kernels cannot serve: torch's own SDPA runs them, announced once per reason.
UNSERVED = {
    "float64": lambda: ((_t(2, 2, 5, 8, dtype=torch.float64),) * 3, {}),
    "head dim 300": lambda: ((_t(1, 2, 5, 300),) * 3, {}),
    "a mask that requires grad": lambda: ((_t(2, 2, 5, 8),) * 3, dict(attn_mask=_t(5, 5).requires_grad_())),
    "enable_gqa, key and value heads differ": lambda: ((_t(2, 4, 5, 8), _t(2, 2, 7, 8), _t(2, 1, 7, 8)),
                                                       dict(enable_gqa=True)),
}


@pytest.mark.parametrize("name", UNSERVED)
def test_what_the_kernels_cannot_serve_runs_on_torch_with_a_warning(name, monkeypatch):
    set_mode(monkeypatch, "fallback")
    torch.manual_seed(14)
    args, kwargs = UNSERVED[name]()
    with pytest.warns(RuntimeWarning, match=f"running {TORCH} because"):
        out = scaled_dot_product_attention(*args, **kwargs)
    expected = F.scaled_dot_product_attention(*args, **kwargs)
    assert torch.equal(out, expected)
    reasons = flash_attn_metal.stats()["fallbacks"]
    assert len(reasons) == 1 and list(reasons.values()) == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        scaled_dot_product_attention(*args, **kwargs)
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    with pytest.raises(NotImplementedError, match="FLASH_ATTN_METAL_STRICT=1"):
        scaled_dot_product_attention(*args, **kwargs)


def test_dropout_runs_on_the_kernels(monkeypatch):
    set_mode(monkeypatch, "kernels")
    torch.manual_seed(15)
    q = torch.randn(2, 2, 64, 8)
    out = scaled_dot_product_attention(q, q, torch.ones_like(q), dropout_p=0.5)
    assert any("dropout" in name for name in flash_attn_metal.stats()["launches"])
    # Each output is the sum of the kept probabilities, rescaled by 2: 1 on average, not everywhere.
    assert abs(out.mean().item() - 1.0) < 0.1 and out.std().item() > 0.1
    assert torch.equal(scaled_dot_product_attention(q, q, q, dropout_p=-0.5), scaled_dot_product_attention(q, q, q))


SINK_CASES = {"full": dict(), "causal": dict(is_causal=True), "bool-mask": dict(mask="bool"),
              "float-mask-gqa": dict(mask="float", enable_gqa=True)}


@pytest.mark.parametrize("case, mode", [
    pytest.param(case, mode, id=f"{name}-{mode}")
    for name, case in SINK_CASES.items() for mode in MODES])
def test_sinks_match_the_float64_naive_attention(case, mode, monkeypatch):
    from naive import naive_attention

    set_mode(monkeypatch, mode)
    torch.manual_seed(16)
    case = dict(case)
    kind = case.pop("mask", "")
    hk = 2 if case.get("enable_gqa") else 4
    q = torch.randn(2, 4, 6, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hk, 9, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 1, 6, 9) > 0.4
    keep[0, 0, 2] = False  # a row with nothing but the sink
    mask = {"": None, "bool": keep, "float": torch.randn(2, 1, 6, 9).masked_fill(~keep, -math.inf)}[kind]
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = scaled_dot_product_attention(*leaves[:3], attn_mask=mask, sinks=leaves[3], **case)
    if mode == "kernels":
        assert flash_attn_metal.stats()["launches"]
    expected = []
    for b in range(2):
        m = None if mask is None else mask[b].expand(4, 6, 9)
        o, _ = naive_attention(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), mask=m,
                               sinks=sinks, causal=case.get("is_causal", False), top_left=True)
        expected.append(o.transpose(0, 1))
    expected = torch.stack(expected)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    grad = torch.randn_like(expected)
    ours = torch.autograd.grad(out, leaves, grad.float())
    theirs = torch.autograd.grad(expected, (q, k, v, sinks), grad)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), ours, theirs):
        assert torch.allclose(a.double(), b, atol=1e-4), name


@pytest.mark.parametrize("sinks, error, match", [
    (torch.zeros(4, dtype=torch.float64), flash_attn_metal.ArgumentError, "sinks must be float32"),
    (torch.zeros(2), ValueError, r"sinks must have shape \(4,\)"),
])
def test_bad_sinks_are_rejected(sinks, error, match, monkeypatch):
    set_mode(monkeypatch, "reference")
    q = torch.randn(1, 4, 3, 8)
    scaled_dot_product_attention(q, q, q, sinks=torch.zeros(4))  # the must-pass twin
    with pytest.raises(error, match=match):
        scaled_dot_product_attention(q, q, q, sinks=sinks)
    with pytest.raises(error, match=match):  # also where torch runs the call
        scaled_dot_product_attention(q.double(), q.double(), q.double(), sinks=sinks)
