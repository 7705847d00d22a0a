"""Backend choice, the announced fallback (one warning per reason), strict mode and stats()."""

from __future__ import annotations

import warnings

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import flash_attn_func, routing


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(routing, "_warned", set())
    monkeypatch.delenv("FLASH_ATTN_METAL_STRICT", raising=False)
    monkeypatch.delenv("FLASH_ATTN_METAL_BACKEND", raising=False)
    flash_attn_metal.reset_stats()


def inputs():
    return torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)


def test_cpu_tensors_fall_back_with_one_warning_per_reason():
    with pytest.warns(RuntimeWarning, match="the tensors are on cpu"):
        flash_attn_func(*inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call with the same reason is silent
        flash_attn_func(*inputs())
    (reason, count), = flash_attn_metal.stats()["fallbacks"].items()
    assert "cpu" in reason and count == 2


def test_reference_backend_is_silent():
    import os

    os.environ["FLASH_ATTN_METAL_BACKEND"] = "reference"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            flash_attn_func(*inputs())
    finally:
        del os.environ["FLASH_ATTN_METAL_BACKEND"]
    assert flash_attn_metal.stats()["fallbacks"] == {}


def test_strict_mode_turns_fallbacks_into_errors(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    flash_attn_func(*inputs())  # asked for: not a fallback
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "auto")
    with pytest.raises(NotImplementedError, match="the tensors are on cpu"):
        flash_attn_func(*inputs())


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "metal")
    with pytest.raises(ValueError, match="FLASH_ATTN_METAL_BACKEND must be one of"):
        flash_attn_func(*inputs())


def test_reset_stats_clears_counters():
    with pytest.warns(RuntimeWarning):
        flash_attn_func(*inputs())
    assert flash_attn_metal.stats()["fallbacks"]
    flash_attn_metal.reset_stats()
    assert flash_attn_metal.stats() == {"launches": {}, "compiles": 0, "cache_hits": {"memory": 0, "disk": 0},
                                        "fallbacks": {}}
