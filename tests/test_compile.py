"""torch.compile and torch.library.opcheck over the kernels' custom ops (CPU tensors through the emulator)."""

from __future__ import annotations

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func
from flash_attn_metal.ops import backward as backward_op
from flash_attn_metal.ops import forward as forward_op


pytestmark = pytest.mark.usefixtures("emulator_strict")


def inputs(requires_grad=True):
    torch.manual_seed(0)
    return [torch.randn(1, 20, 2, 32, requires_grad=requires_grad) for _ in range(3)]


def test_compile_fullgraph_gives_the_same_values_and_gradients():
    q, k, v = inputs()

    def attend(q, k, v):
        return flash_attn_func(q, k, v, causal=True, window_size=(6, -1))

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True)  # a graph break would raise
    out = compiled(q, k, v)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    flash_attn_metal.reset_stats()
    eager = attend(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v), grad)
    assert flash_attn_metal.stats()["launches"]  # the kernels ran, not a fallback
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def op_args(q, k, v):
    return (q, k, v, 32**-0.5, True, -1, 0, 0.0, None, None, None, 20, 20, "emulator")


def test_opcheck_forward_and_backward():
    q, k, v = inputs()
    torch.library.opcheck(forward_op, op_args(q, k, v))
    out, _, stats = forward_op(*op_args(*(t.detach() for t in (q, k, v))))
    dout = torch.randn_like(out)
    torch.library.opcheck(backward_op, (dout, q.detach(), k.detach(), v.detach(), out, stats, *op_args(q, k, v)[3:]))


def test_opcheck_would_catch_a_wrong_fake():
    """Negative control: a fake whose shape disagrees with the kernel fails opcheck."""

    @torch.library.custom_op("flash_attn_metal_test::wrong_fake", mutates_args=())
    def wrong(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @wrong.register_fake
    def _(x):
        return x.new_empty((x.shape[0] + 1,))

    with pytest.raises(Exception):
        torch.library.opcheck(wrong, (torch.randn(3),))


def varlen_inputs():
    torch.manual_seed(1)
    q, k, v = (torch.randn(12, 2, 32, requires_grad=True) for _ in range(3))
    return q, k, v, torch.tensor([0, 5, 5, 12], dtype=torch.int32)


def test_varlen_compiles_fullgraph_with_the_checks_run_by_the_op():
    """cu_seqlens cannot be read while tracing: the op checks them and sizes its grids when the graph runs."""
    q, k, v, cu = varlen_inputs()

    def attend(q, k, v, cu, max_seqlen):
        return flash_attn_metal.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=False)
    out = compiled(q, k, v, cu, 7)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    eager = attend(q, k, v, cu, 7)
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(eager, (q, k, v), grad)))
    bad = torch.tensor([0, 5, 4, 12], dtype=torch.int32)  # decreasing: caught when the graph runs
    with pytest.raises(flash_attn_metal.ArgumentError, match="cu_seqlens_q must be non-decreasing"):
        compiled(q, k, v, bad, 7)


def cache_call(q, k_new, v_new, k_cache, v_cache, seqlens, table=None):
    return flash_attn_metal.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                   block_table=table, causal=True)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_kv_cache_compiles_fullgraph_and_checks_before_the_append(paged):
    torch.manual_seed(2)
    q, k_new, v_new = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 2, 32), torch.randn(2, 3, 2, 32)
    shape = (4, 8, 2, 32) if paged else (2, 16, 2, 32)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32) if paged else None
    seqlens = torch.tensor([4, 13], dtype=torch.int32)
    caches = [torch.randn(shape) for _ in range(2)]
    eager_caches = [c.clone() for c in caches]

    torch._dynamo.reset()
    compiled = torch.compile(cache_call, fullgraph=True, dynamic=False)
    out = compiled(q, k_new, v_new, *caches, seqlens, table)
    eager = cache_call(q, k_new, v_new, *eager_caches, seqlens, table)
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(caches, eager_caches))  # the append happened, as in eager

    before = [c.clone() for c in caches]
    with pytest.raises(flash_attn_metal.ArgumentError, match="sequence 1 needs 17 cache rows"):
        compiled(q, k_new, v_new, *caches, seqlens + 1, table)
    assert all(torch.equal(a, b) for a, b in zip(caches, before))  # nothing written
