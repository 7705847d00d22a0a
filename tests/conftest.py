"""Test-session settings shared by every test file."""

from __future__ import annotations

import os
import tempfile

import pytest

# torch.compile's on-disk caches are keyed by the traced graph, not by what our custom ops do: a graph compiled by
# an older checkout (another schema of torch.ops.flash_attn_metal.*) would be replayed. Each session compiles into
# a fresh directory.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flash-attn-metal-inductor-")


# Backends a test file selects with `pytestmark = pytest.mark.usefixtures(...)`.


@pytest.fixture
def emulator_strict(monkeypatch):
    """The kernels through the Metal emulator, strict (a fallback to PyTorch fails the test), with fresh stats."""
    import flash_attn_metal

    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    flash_attn_metal.reset_stats()


@pytest.fixture
def reference_backend(monkeypatch):
    """The pure-PyTorch reference runs every call."""
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")


@pytest.fixture
def debug_emulator(monkeypatch):
    """Kernels run as bounds-checking debug builds (a backend of their own, so no cached build is reused)."""
    monkeypatch.setenv("FLASH_ATTN_METAL_EMULATOR_DEBUG", "1")
