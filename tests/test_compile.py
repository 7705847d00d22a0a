"""torch.compile and torch.library.opcheck over the kernels' custom ops (CPU tensors through the emulator)."""

from __future__ import annotations

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func
from flash_attn_metal.ops import backward as backward_op
from flash_attn_metal.ops import forward as forward_op


@pytest.fixture(autouse=True)
def emulator_strict(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")


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
