"""The replay of repeated eager inference calls (`fastpath`): a call with a remembered signature skips the full
path and gives the full path's answer; any difference the full path would act on (a stride, an option's value
or type, the backend setting, autograd) takes the full path again, so bad input still raises.

Each test counts the full path's runs through `interface._problem`, which only the full path calls."""

from __future__ import annotations

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import fastpath, flash_attn_func, flash_attn_qkvpacked_func, interface
from flash_attn_metal.kernels import launch


@pytest.fixture(autouse=True)
def fresh_launches(emulator_strict):
    """No launch remembered before or after a test."""
    fastpath.clear()
    yield
    fastpath.clear()


@pytest.fixture
def full_path_runs(monkeypatch) -> list[int]:
    runs = []
    full_path = interface._problem

    def counted(*args, **kwargs):
        runs.append(1)
        return full_path(*args, **kwargs)

    monkeypatch.setattr(interface, "_problem", counted)
    return runs


def qkv(dtype=torch.float16, seqlen=5):
    torch.manual_seed(0)
    return [torch.randn(2, seqlen, 4, 16, dtype=dtype) for _ in range(3)]


def test_a_repeated_call_replays_the_launch_and_matches_the_full_path(full_path_runs):
    q, k, v = qkv()
    with torch.no_grad():
        first = flash_attn_func(q, k, v, causal=True)
        again = flash_attn_func(q, k, v, causal=True)
        other_values = flash_attn_func(q + 1, k, v, causal=True)  # same signature, new tensors
    assert len(full_path_runs) == 1 and flash_attn_metal.stats()["launches"]
    assert torch.equal(first, again)
    fastpath.clear()
    with torch.no_grad():
        assert torch.equal(flash_attn_func(q + 1, k, v, causal=True), other_values)  # the full path agrees
    assert len(full_path_runs) == 2


def test_replay_returns_what_the_full_path_returns(full_path_runs):
    q, k, v = qkv()
    with torch.no_grad():
        out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
        out2, lse2, probs2 = flash_attn_func(q, k, v, return_attn_probs=True)
    assert len(full_path_runs) == 1
    assert torch.equal(out, out2) and torch.equal(lse, lse2) and probs.numel() == probs2.numel() == 0
    assert out2.is_contiguous() and lse2.shape == (2, 4, 5) and lse2.dtype == torch.float32


@pytest.mark.parametrize("change", ["stride", "shape", "dtype", "option", "window"])
def test_a_different_signature_takes_the_full_path(full_path_runs, change):
    q, k, v = qkv()
    with torch.no_grad():
        flash_attn_func(q, k, v)
        flash_attn_func(q, k, v)
        assert len(full_path_runs) == 1
        if change == "stride":
            flash_attn_func(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)
        elif change == "shape":
            flash_attn_func(*qkv(seqlen=6))
        elif change == "dtype":
            flash_attn_func(*qkv(torch.float32))
        elif change == "option":
            flash_attn_func(q, k, v, softmax_scale=0.5)
        else:
            flash_attn_func(q, k, v, window_size=(2, 0))
    assert len(full_path_runs) == 2


@pytest.mark.parametrize("bad, message", [
    (dict(softmax_scale=True), "softmax_scale must be a real number"),  # True == 1 but is no scale
    (dict(window_size=(-1.0, -1)), "window_size must hold integers"),  # -1.0 == -1 but is no window
    (dict(dropout_p=1.0), "dropout_p must be in"),
])
def test_bad_options_still_raise_after_a_good_call_was_remembered(full_path_runs, bad, message):
    q, k, v = qkv()
    good = dict(softmax_scale=1, window_size=(-1, -1), dropout_p=0.0)
    with torch.no_grad():
        flash_attn_func(q, k, v, **good)
        flash_attn_func(q, k, v, **good)
        assert len(full_path_runs) == 1  # remembered
        with pytest.raises((TypeError, ValueError), match=message):
            flash_attn_func(q, k, v, **{**good, **bad})


def test_the_backend_setting_is_part_of_the_signature(monkeypatch, full_path_runs):
    q, k, v = qkv()
    with torch.no_grad():
        flash_attn_func(q, k, v)
        launches = flash_attn_metal.stats()["launches"]
        monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
        flash_attn_func(q, k, v)
        assert flash_attn_metal.stats()["launches"] == launches  # the reference ran: no kernel launch
        monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
        flash_attn_func(q, k, v)
    assert len(full_path_runs) == 2 and flash_attn_metal.stats()["launches"] != launches


def test_calls_that_need_autograd_take_the_full_path_and_get_gradients(full_path_runs):
    q, k, v = qkv(torch.float32)
    with torch.no_grad():
        flash_attn_func(q, k, v)
    q.requires_grad_(True)
    out = flash_attn_func(q, k, v)
    out.sum().backward()
    assert len(full_path_runs) == 2 and out.grad_fn is not None and q.grad is not None
    q.grad = None
    with torch.no_grad():  # no gradient needed: the remembered launch serves it
        flash_attn_func(q, k, v)
    assert len(full_path_runs) == 2


def test_tensor_options_are_never_remembered(full_path_runs):
    q, k, v = qkv()
    slopes = torch.rand(4)
    with torch.no_grad():
        flash_attn_func(q, k, v, alibi_slopes=slopes)
        flash_attn_func(q, k, v, alibi_slopes=slopes)
        flash_attn_func(q, k, v, window_size=torch.tensor([2, 0]))
        flash_attn_func(q, k, v, window_size=torch.tensor([2, 0]))
    assert len(full_path_runs) == 4 and not fastpath._launches


def test_packed_calls_replay_too(full_path_runs):
    torch.manual_seed(0)
    qkv_packed = torch.randn(2, 5, 3, 4, 16, dtype=torch.float16)
    with torch.no_grad():
        first = flash_attn_qkvpacked_func(qkv_packed, causal=True)
        again = flash_attn_qkvpacked_func(qkv_packed, causal=True)
    assert len(full_path_runs) == 1 and torch.equal(first, again)


def test_the_number_of_remembered_signatures_is_bounded(monkeypatch, full_path_runs):
    monkeypatch.setattr(fastpath, "MAX_LAUNCHES", 2)
    q, k, v = qkv()
    with torch.no_grad():
        for scale in (0.1, 0.2, 0.3):
            flash_attn_func(q, k, v, softmax_scale=scale)
        assert len(fastpath._launches) == 2 and len(full_path_runs) == 3
        flash_attn_func(q, k, v, softmax_scale=0.3)  # among the newest two: replayed
        assert len(full_path_runs) == 3
        flash_attn_func(q, k, v, softmax_scale=0.1)  # the oldest was evicted: the full path again
        assert len(full_path_runs) == 4


@pytest.mark.parametrize("shape", [(2, 5, 4, 16), (1, 1, 1, 8), (3, 0, 2, 8), (4, 7)])
def test_contiguous_strides_match_torch(shape):
    assert launch.contiguous_strides(shape) == torch.empty(shape).stride()
    if all(shape):
        assert launch.contiguous_strides(shape) != torch.empty(shape).transpose(0, -1).stride()
