"""patch_sdpa() and patch_sdpa_globally(): F.scaled_dot_product_attention reaches the kernels for the tensors they
serve (CPU tensors under FLASH_ATTN_METAL_BACKEND=emulator here, MPS tensors on a Mac) and torch otherwise, also
inside torch.compile(fullgraph=True)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as imported_sdpa

import flash_attn_metal
from flash_attn_metal import patch_sdpa, patch_sdpa_globally


pytestmark = pytest.mark.usefixtures("emulator_strict")


def inputs(requires_grad=False):
    torch.manual_seed(0)
    return [torch.randn(2, 12, 4, 32).transpose(1, 2).requires_grad_(requires_grad) for _ in range(3)]


def launches() -> int:
    return sum(flash_attn_metal.stats()["launches"].values())


def test_the_patch_routes_every_spelling_of_the_call_to_the_kernels():
    q, k, v = inputs()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert launches() == 0  # unpatched: torch
    with patch_sdpa():
        for sdpa in (F.scaled_dot_product_attention, imported_sdpa, torch.nn.functional.scaled_dot_product_attention):
            out = sdpa(q, k, v, is_causal=True)
            assert torch.allclose(out, expected, atol=1e-5)
        assert torch.equal(torch.matmul(q, k.transpose(-1, -2)), q @ k.transpose(-1, -2))  # other functions: torch's
    assert launches() == 3
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert launches() == 3  # the block has ended


def test_tensors_the_kernels_do_not_serve_go_to_torch_unchanged(monkeypatch):
    q, k, v = inputs()
    for backend in ("auto", "reference"):  # CPU tensors reach the kernels only under the emulator setting
        monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", backend)
        with patch_sdpa():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert flash_attn_metal.stats() == {"launches": {}, "compiles": 0, "cache_hits": {"memory": 0, "disk": 0},
                                        "fallbacks": {}}


def test_bad_input_under_the_patch_raises_torchs_error():
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, q[..., :7], q)
    with patch_sdpa(), pytest.raises(RuntimeError) as ours:
        F.scaled_dot_product_attention(q, q[..., :7], q)
    assert str(ours.value) == str(theirs.value)


def test_compile_fullgraph_under_the_patch():
    q, k, v = inputs(requires_grad=True)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(dim=1)

    torch._dynamo.reset()
    with patch_sdpa():
        compiled = torch.compile(attend, fullgraph=True)  # a graph break would raise
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert launches() > 0  # the kernels ran inside the compiled graph, forward and backward
        flash_attn_metal.reset_stats()
        eager = attend(q, k, v)
        eager_grads = torch.autograd.grad(eager.sum(), (q, k, v))
    assert torch.equal(out, eager) and all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_compile_fullgraph_traces_a_fallback_into_the_graph(monkeypatch):
    """What the kernels cannot serve (here a mask that requires grad) is traced as torch's SDPA; strict mode still
    refuses it."""
    monkeypatch.delenv("FLASH_ATTN_METAL_STRICT")
    q, k, v = inputs()
    mask = torch.randn(12, 12).requires_grad_()

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch._dynamo.reset()
    with patch_sdpa():
        out = torch.compile(attend, fullgraph=True)(q, k, v, mask)
    assert torch.allclose(out, attend(q, k, v, mask), atol=1e-6)
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    torch._dynamo.reset()
    with patch_sdpa(), pytest.raises(Exception, match="FLASH_ATTN_METAL_STRICT=1"):
        torch.compile(attend, fullgraph=True)(q, k, v, mask)


def test_the_global_patch_reaches_every_thread(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", F.scaled_dot_product_attention)  # undone after the test
    q, k, v = inputs()
    expected = F.scaled_dot_product_attention(q, k, v)
    patch_sdpa_globally()
    patch_sdpa_globally()  # a second call changes nothing
    results = []
    worker = threading.Thread(target=lambda: results.append(torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    worker.start()
    worker.join()
    assert torch.allclose(results[0], expected, atol=1e-5) and launches() == 1
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "auto")  # CPU tensors: torch's own, untouched
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, scale=0.5), imported_sdpa(q, k, v, scale=0.5))
    assert launches() == 1
