"""The generated backward kernels, through the public functions under autograd in the emulator (strict), with
the upstream rule for gradients: max |ours - fp32 reference| <= 3 * max |plain low-precision PyTorch - fp32
reference| + small slack, for dq, dk and dv each."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from flash_attn_metal.bert_padding import pad_input
from flash_attn_metal.problem import AttentionProblem
from flash_attn_metal.reference import attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SLACK = 1e-4


pytestmark = pytest.mark.usefixtures("emulator_strict")


def reference_grads(q, k, v, grad, upcast, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    problem = AttentionProblem(q=leaves[0], k=leaves[1], v=leaves[2], softmax_scale=q.shape[-1] ** -0.5,
                               dropout_p=0.0, **kw)
    out = attention(problem, upcast=upcast)[0]
    return torch.autograd.grad(out, leaves, grad.to(out.dtype))


def assert_grads_within_rule(ours, q, k, v, grad, **kw):
    exact = reference_grads(q, k, v, grad, True, **kw)
    low = reference_grads(q, k, v, grad, False, **kw)
    for name, g, r, lp in zip(("dq", "dk", "dv"), ours, exact, low):
        assert torch.isfinite(g).all(), name
        err = (g.float() - r.float()).abs().max().item()
        bound = 3 * (lp.float() - r.float()).abs().max().item() + SLACK
        assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e}"


def mask_args(causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    return dict(causal=causal, window_left=window[0], window_right=0 if causal else window[1], softcap=softcap,
                alibi_slopes=alibi)


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: str
    d: int
    sq: int
    sk: int
    h: int = 2
    hk: int = 2
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False


CASES = [
    Case("fp16", 64, 7, 1), Case("bf16", 64, 113, 128, causal=True), Case("fp32", 32, 128, 113),
    Case("fp16", 40, 65, 70, h=4, hk=2), Case("bf16", 80, 33, 45, h=8, hk=1, causal=True),
    Case("fp16", 128, 40, 50), Case("fp32", 256, 20, 30, causal=True), Case("fp16", 192, 24, 24),
    Case("bf16", 59, 33, 45), Case("fp16", 64, 97, 97, window=(16, 8)),
    Case("fp16", 64, 70, 90, softcap=5.0, causal=True), Case("bf16", 64, 70, 90, alibi=True),
    Case("fp32", 64, 90, 70, h=4, hk=1, alibi=True, softcap=3.0, window=(9, 4)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.dtype}-d{c.d}-{c.sq}x{c.sk}-h{c.h}/{c.hk}" + ("-causal" if c.causal else "")
                                             + (f"-w{c.window}" if c.window != (-1, -1) else "")
                                             + ("-softcap" if c.softcap else "") + ("-alibi" if c.alibi else "")
                                             for c in CASES])
def test_gradients_match_the_reference(case: Case):
    torch.manual_seed(hash(case) % 1000)
    dtype = DTYPES[case.dtype]
    q = torch.randn(2, case.sq, case.h, case.d, dtype=dtype, requires_grad=True)
    k = torch.randn(2, case.sk, case.hk, case.d, dtype=dtype, requires_grad=True)
    v = torch.randn(2, case.sk, case.hk, case.d, dtype=dtype, requires_grad=True)
    alibi = torch.rand(case.h) * 0.3 if case.alibi else None
    out = flash_attn_func(q, k, v, causal=case.causal, window_size=case.window, softcap=case.softcap,
                          alibi_slopes=alibi)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert any(name.startswith("attention_backward") for name in flash_attn_metal.stats()["launches"])
    assert_grads_within_rule(ours, q, k, v, grad, **mask_args(case.causal, case.window, case.softcap, alibi))


def test_a_wrong_gradient_would_be_caught():
    """Negative control: gradients of a different mask fail the same rule."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 30, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_grads_within_rule(ours, q, k, v, grad, **mask_args(causal=True))


def test_backward_is_bitwise_deterministic():
    torch.manual_seed(2)
    q = torch.randn(2, 70, 4, 64, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 90, 1, 64, dtype=torch.float16, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=True, deterministic=True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_overflow_style_inputs():
    torch.manual_seed(3)
    q = (torch.randn(2, 64, 2, 32) * 5).half().requires_grad_()
    k = (torch.randn(2, 64, 2, 32) * 3).half().requires_grad_()
    v = (torch.randn(2, 64, 2, 32) * 3).half().requires_grad_()
    out = flash_attn_func(q, k, v, causal=True)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert_grads_within_rule(ours, q, k, v, grad, **mask_args(causal=True))


def test_fully_masked_rows_get_zero_gradients():
    torch.manual_seed(4)
    q = torch.randn(1, 9, 2, 32, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(1, 4, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=True)  # query rows 0..4 see no key
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[:, :5] == 0).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_packed_variants_return_gradients_for_the_packed_tensor():
    torch.manual_seed(5)
    qkv = torch.randn(2, 40, 3, 2, 32, dtype=torch.float16, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    q, k, v = qkv.unbind(2)
    assert_grads_within_rule(dqkv.unbind(2), q, k, v, grad, **mask_args(causal=True))
    q2 = torch.randn(2, 30, 4, 32, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(2, 50, 2, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    out = flash_attn_kvpacked_func(q2, kv)
    grad = torch.randn_like(out)
    dq, dkv = torch.autograd.grad(out, (q2, kv), grad)
    assert_grads_within_rule((dq, *dkv.unbind(2)), q2, kv[:, :, 0], kv[:, :, 1], grad, **mask_args())


def test_varlen_gradients_repadded_match_padded_references():
    torch.manual_seed(6)
    lens = [17, 0, 40, 9]
    b, s, h, d = len(lens), max(lens), 2, 32
    mask = torch.arange(s)[None, :] < torch.tensor(lens)[:, None]
    indices = torch.nonzero(mask.flatten()).flatten()
    q = torch.randn(sum(lens), h, d, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(sum(lens), h, d, dtype=torch.float16, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 17, 17, 57, 66], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu, cu, s, s, causal=True)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    for i in (0, 2, 3):  # each sequence against its own padded reference
        rows = slice(int(cu[i]), int(cu[i + 1]))
        sub = [t[rows].unsqueeze(0) for t in (q, k, v)]
        assert_grads_within_rule([g[rows].unsqueeze(0) for g in ours], *sub, grad[rows].unsqueeze(0),
                                 **mask_args(causal=True))
    padded = pad_input(ours[0], indices, b, s)  # the re-padded layout keeps zeros where no token was
    assert (padded[~mask] == 0).all()


def test_return_attn_probs_under_autograd_and_lse_gets_no_gradient():
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 24, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert probs.numel() == 0 and not lse.requires_grad
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert_grads_within_rule(ours, q, k, v, grad, **mask_args(causal=True))


def test_gradients_after_a_split_kv_forward():
    """Few query rows over many keys: the forward splits the keys; the backward reads its merged LSE."""
    torch.manual_seed(21)
    q = torch.randn(1, 2, 2, 64, requires_grad=True)
    k, v = (torch.randn(1, 900, 1, 64, requires_grad=True) for _ in range(2))
    out = flash_attn_func(q, k, v, causal=True)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert any(name.endswith("_split_combine") for name in flash_attn_metal.stats()["launches"])
    assert_grads_within_rule(ours, q, k, v, grad, **mask_args(causal=True))
