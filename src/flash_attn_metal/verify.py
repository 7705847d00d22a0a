"""Checking a kernel's results on any device: the upstream tolerance rule against references computed on the CPU.

    exact, low = references(problem, dout)     # fp32 reference, plain low-precision PyTorch (CPU copies)
    compare("out", ours, exact.out, low.out, factor=OUTPUT_FACTOR)   # -> Comparison(error, bound)
    failures(compare_results(exact, low, out=out, lse=lse, grads=(dq, dk, dv)))   # -> None, or what failed

The rule (flash-attn's own test method): our max error against the fp32 reference is at most 2x (3x for
gradients) the max error of plain low-precision PyTorch (`upcast=False, reorder_ops=True`), plus a small slack
relative to the values' scale. The references run on the CPU whatever device ran the kernels, so a device's own
numerics (MPS has shipped wrong attention before) never enter the oracle. `selftest` and `tune` use this.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

from .problem import AttentionProblem, KVCache
from .reference import attention

OUTPUT_FACTOR, GRADIENT_FACTOR = 2, 3
OUTPUT_SLACK, GRADIENT_SLACK = 1e-5, 1e-4
LSE_TOLERANCE = 1e-4  # fp32 either way: only the summation order differs


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound  # False for a NaN error

    def __str__(self) -> str:
        return f"{self.name} {self.error:.1e} (bound {self.bound:.1e})"


@dataclass(frozen=True)
class Result:
    out: torch.Tensor
    lse: torch.Tensor
    grads: tuple[torch.Tensor, ...]  # dq, dk, dv; empty without a dout


def to_cpu(problem: AttentionProblem) -> AttentionProblem:
    """The same problem on detached CPU copies (side tensors too)."""
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu().clone()

    cache = problem.kv_cache
    if cache is not None:
        cache = KVCache(cpu(cache.seqlens), cpu(cache.leftpad), cpu(cache.batch_idx), cpu(cache.block_table))
    return replace(problem, q=cpu(problem.q), k=cpu(problem.k), v=cpu(problem.v),
                   alibi_slopes=cpu(problem.alibi_slopes), cu_seqlens_q=cpu(problem.cu_seqlens_q),
                   cu_seqlens_k=cpu(problem.cu_seqlens_k), kv_cache=cache)


def references(problem: AttentionProblem, dout: torch.Tensor | None = None) -> tuple[Result, Result]:
    """(fp32 reference, plain low-precision PyTorch) of `problem`, on the CPU, with the gradients of q, k and v
    for the output gradient `dout` when one is given."""
    base = to_cpu(problem)
    results = []
    for upcast in (True, False):
        leaves = [t.requires_grad_(dout is not None) for t in (base.q.clone(), base.k.clone(), base.v.clone())]
        p = replace(base, q=leaves[0], k=leaves[1], v=leaves[2])
        with torch.enable_grad():
            out, lse = attention(p, upcast=upcast, reorder_ops=not upcast)
            grads = torch.autograd.grad(out, leaves, dout.cpu().to(out.dtype)) if dout is not None else ()
        results.append(Result(out.detach(), lse.detach(), tuple(grads)))
    return results[0], results[1]


def compare(name: str, ours: torch.Tensor, exact: torch.Tensor, low: torch.Tensor, *, factor: int) -> Comparison:
    """Max |ours - exact| against factor x max |low - exact| + slack (a NaN or inf in ours fails)."""
    ours, exact, low = (t.detach().float().cpu() for t in (ours, exact, low))
    if ours.shape != exact.shape:
        return Comparison(f"{name} shape {tuple(ours.shape)} != {tuple(exact.shape)}", float("inf"), 0.0)
    if ours.numel() == 0:
        return Comparison(name, 0.0, 0.0)
    error = (ours - exact).abs().max().item() if torch.isfinite(ours).all() else float("inf")
    scale = max(1.0, exact.abs().max().item())
    slack = OUTPUT_SLACK if factor == OUTPUT_FACTOR else GRADIENT_SLACK
    return Comparison(name, error, factor * (low - exact).abs().max().item() + slack * scale)


def compare_lse(ours: torch.Tensor, exact: torch.Tensor) -> Comparison:
    """Same +inf rows (fully masked), and the finite entries within LSE_TOLERANCE."""
    ours, exact = ours.detach().float().cpu(), exact.detach().float().cpu()
    if ours.shape != exact.shape or not torch.equal(torch.isposinf(ours), torch.isposinf(exact)):
        return Comparison("lse (+inf rows differ)", float("inf"), LSE_TOLERANCE)
    finite = torch.isfinite(exact)
    error = (ours[finite] - exact[finite]).abs().max().item() if finite.any() else 0.0
    return Comparison("lse", error if error == error else float("inf"), LSE_TOLERANCE)


def compare_results(exact: Result, low: Result, *, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                    grads: Sequence[torch.Tensor] = ()) -> list[Comparison]:
    """Whichever of out, lse and (dq, dk, dv) are given, each against `references`' results by its rule."""
    found = [] if out is None else [compare("out", out, exact.out, low.out, factor=OUTPUT_FACTOR)]
    found += [] if lse is None else [compare_lse(lse, exact.lse)]
    return found + [compare(name, ours, e, lp, factor=GRADIENT_FACTOR)
                    for name, ours, e, lp in zip(("dq", "dk", "dv"), grads, exact.grads, low.grads)]


def failures(comparisons: Iterable[Comparison]) -> str | None:
    """The comparisons that fail, in one line; None when every one holds."""
    return "; ".join(str(c) for c in comparisons if not c.ok) or None
