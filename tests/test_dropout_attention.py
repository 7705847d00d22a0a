"""Dropout through the public functions, checked as flash-attn's tests check it: S_dmask decoded with the
upstream decoders (test_dropout_s_dmask.py), `out` and the gradients against attention recomputed in float64
with the mask read back from S_dmask, under the upstream rule (2x plain low-precision PyTorch's error for out
and the softmax, 3x for gradients, plus a small slack).

Each test runs on the reference path and on the kernel path (the emulator, strict): both draw the same Philox bits
(kernels/dropout.py), so both are checked against the mask their own S_dmask reveals.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func, flash_attn_varlen_func, settings
from flash_attn_metal.reference import attention_ref
from test_dropout_s_dmask import convert, dropout_fraction, normalize

SLACK = 1e-4
BACKENDS = ["reference", "kernels"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv(settings.BACKEND, "reference")
    else:
        monkeypatch.setenv(settings.BACKEND, "emulator")
        monkeypatch.setenv(settings.STRICT, "1")  # a fallback to the reference raises
    flash_attn_metal.reset_stats()
    return request.param


def assert_ran_on(backend: str) -> None:
    launches = flash_attn_metal.stats()["launches"]
    assert bool(launches) == (backend == "kernels")


@dataclasses.dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    b: int
    sq: int
    sk: int
    h: int
    hk: int
    d: int
    causal: bool = False
    window: tuple = (-1, -1)
    q_lens: tuple | None = None  # varlen: each sequence's lengths (0 allowed)
    k_lens: tuple | None = None

    @property
    def varlen(self) -> bool:
        return self.q_lens is not None

    @property
    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.varlen:
            return torch.tensor(self.q_lens), torch.tensor(self.k_lens)
        return torch.full((self.b,), self.sq), torch.full((self.b,), self.sk)


CASES = {
    "fp16": Case(torch.float16, 2, 70, 90, 4, 4, 64),
    "bf16-gqa-causal": Case(torch.bfloat16, 2, 80, 80, 6, 2, 128, causal=True),
    "fp16-local": Case(torch.float16, 2, 64, 100, 4, 4, 40, window=(9, 4)),
    "bf16-mqa-causal-local": Case(torch.bfloat16, 1, 90, 70, 4, 1, 32, causal=True, window=(12, 0)),
    "fp16-varlen-empty": Case(torch.float16, 4, 50, 60, 4, 2, 64, q_lens=(30, 0, 50, 12), k_lens=(40, 0, 25, 60)),
    "bf16-varlen-causal-gqa": Case(torch.bfloat16, 3, 40, 45, 4, 2, 96, causal=True, q_lens=(40, 7, 0),
                                   k_lens=(45, 30, 0)),
}
P = 0.17


@dataclasses.dataclass
class Call:
    """One call's inputs in its own layout (padded, or varlen's packed rows) and in the padded layout."""

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None

    @classmethod
    def make(cls, case: Case, requires_grad: bool = False) -> "Call":
        c = case
        q, k, v = torch.randn(c.b, c.sq, c.h, c.d), torch.randn(c.b, c.sk, c.hk, c.d), torch.randn(c.b, c.sk, c.hk, c.d)
        if not c.varlen:
            return cls(c, *(t.to(c.dtype).requires_grad_(requires_grad) for t in (q, k, v)))
        q_lens, k_lens = c.lengths
        q = torch.cat([q[i, :n] for i, n in enumerate(c.q_lens)])
        k, v = (torch.cat([t[i, :n] for i, n in enumerate(c.k_lens)]) for t in (k, v))
        cu = lambda lens: torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
        return cls(c, *(t.to(c.dtype).requires_grad_(requires_grad) for t in (q, k, v)), cu(q_lens), cu(k_lens))

    def kwargs(self) -> dict:
        c = self.case
        extra = dict(cu_seqlens_q=self.cu_q, cu_seqlens_k=self.cu_k) if c.varlen else {}
        return dict(causal=c.causal, window_size=c.window, **extra)

    def run(self, p: float = P):
        """(out, lse, S_dmask) through the public function."""
        c = self.case
        if c.varlen:
            return flash_attn_varlen_func(self.q, self.k, self.v, self.cu_q, self.cu_k, max(c.q_lens), max(c.k_lens),
                                          p, causal=c.causal, window_size=c.window, return_attn_probs=True)
        return flash_attn_func(self.q, self.k, self.v, p, causal=c.causal, window_size=c.window, return_attn_probs=True)

    def padded(self, t: torch.Tensor, lens: torch.Tensor, rows: int) -> torch.Tensor:
        if not self.case.varlen:
            return t
        out = t.new_zeros((self.case.b, rows, *t.shape[1:]))
        starts = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
        for i, n in enumerate(lens.tolist()):
            out[i, :n] = t[starts[i] : starts[i] + n]
        return out

    def kept(self, S: torch.Tensor) -> torch.Tensor:
        """The dropout mask read back from S_dmask: (b, h, max_sq, max_sk), True where kept."""
        c = self.case
        q_lens, k_lens = c.lengths
        return convert(S, max(q_lens.tolist()), max(k_lens.tolist()), q_lens, k_lens, c.causal, c.window) >= 0

    def reference(self, kept: torch.Tensor, p: float = P, *, truth: bool, inputs=None):
        """(out, probs) with this mask: in float64 (truth), or in the inputs' dtype with K scaled first (plain
        low-precision PyTorch)."""
        q, k, v = inputs or (self.q, self.k, self.v)
        if truth:
            q, k, v = (t.double() for t in (q, k, v))
        out, _, probs = attention_ref(q, k, v, dropout_p=p, dropout_mask=kept, upcast=False, reorder_ops=not truth,
                                      return_probs=True, **self.kwargs())
        return out, probs


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("name", CASES)
def test_out_and_softmax_match_attention_with_the_mask_read_back(backend, name):
    torch.manual_seed(0)
    call = Call.make(CASES[name])
    out, lse, S = call.run()
    assert_ran_on(backend)
    c = call.case
    q_lens, k_lens = c.lengths
    assert S.shape == (c.b, c.h, -(-max(q_lens.tolist()) // 128) * 128, -(-max(k_lens.tolist()) // 128) * 128)
    assert S.dtype == c.dtype
    kept = call.kept(S)
    out_ref, probs_ref = call.reference(kept, truth=True)
    out_pt, probs_pt = call.reference(kept, truth=False)
    bound = 2 * max_error(out_pt, out_ref) + SLACK
    assert max_error(out, out_ref) <= bound
    # the wrong mask (every row's draws shifted one key) must not pass
    shifted, _ = call.reference(kept.roll(1, dims=-1), truth=True)
    assert max_error(out, shifted) > bound
    # the softmax S_dmask encodes, decoded as flash-attn's tests decode it
    sq, sk = kept.shape[-2:]
    qp, kp = call.padded(call.q, q_lens, sq), call.padded(call.k, k_lens, sk)
    attn = normalize(convert(S, sq, sk, q_lens, k_lens, c.causal, c.window).abs(), qp, kp, q_lens, k_lens, c.causal,
                     c.window)
    probs_ref, probs_pt = (t[:, :, :sq, :sk].abs() for t in (probs_ref, probs_pt))
    assert max_error(attn, probs_ref) <= 2 * max_error(probs_pt, probs_ref) + SLACK
    local = c.window != (-1, -1)
    assert abs(dropout_fraction(kept, q_lens, k_lens, c.causal, c.window) - P) <= (0.025 if local else 0.01)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_autograd_through_the_mask_read_back(backend, name):
    torch.manual_seed(1)
    call = Call.make(CASES[name], requires_grad=True)
    out, _, S = call.run()
    assert_ran_on(backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (call.q, call.k, call.v), grad)
    kept = call.kept(S)
    expected = []
    for mask, truth in ((kept, True), (kept, False), (kept.roll(1, dims=-1), True)):
        leaves = [t.detach().clone().requires_grad_() for t in (call.q, call.k, call.v)]
        ref_out, _ = call.reference(mask, truth=truth, inputs=leaves)
        expected.append(torch.autograd.grad(ref_out, leaves, grad.to(ref_out.dtype)))
    truth, plain, wrong_mask = expected
    bounds = [3 * max_error(p, t) + SLACK for p, t in zip(plain, truth)]
    assert all(max_error(ours, t) <= bound for ours, t, bound in zip(grads, truth, bounds))
    assert max_error(grads[2], wrong_mask[2]) > bounds[2]  # dV through the wrong mask must not pass


@pytest.mark.parametrize("name", ["bf16-gqa-causal", "fp16-varlen-empty"])
def test_the_same_seed_reproduces_a_run_and_calls_differ(backend, name):
    torch.manual_seed(2)
    call = Call.make(CASES[name], requires_grad=True)
    grad = torch.randn(call.q.shape, dtype=call.q.dtype)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        out, lse, S = call.run()
        runs.append((out, lse, S, *torch.autograd.grad(out, (call.q, call.k, call.v), grad)))
    assert_ran_on(backend)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    out, _, S = call.run()  # the next call: a new seed and offset
    assert not torch.equal(S >= 0, runs[1][2] >= 0)
    assert not torch.equal(out, runs[1][0])


@pytest.mark.parametrize("p", [0.1, 0.17, 0.5, 0.9])
def test_dropped_fraction_is_within_one_percent_of_p(backend, p):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 256, 4, 32, dtype=torch.float16) for _ in range(3))
    out, _, S = flash_attn_func(q, k, v, p, return_attn_probs=True)
    assert_ran_on(backend)
    lens = torch.full((2,), 256)
    fraction = dropout_fraction(convert(S, 256, 256, lens, lens) >= 0, lens, lens)  # over 2^19 elements
    assert abs(fraction - p) <= 0.01
    assert torch.isfinite(out).all()
