"""Backend choice, the announced fallback (one warning per reason), strict mode, stats(), and the contract with
the kernels' dispatch module (checked here against a stand-in, so it holds whatever the kernels support)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import fastpath, flash_attn_func, routing, settings
from flash_attn_metal.problem import AttentionProblem


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(routing, "_warned", set())
    monkeypatch.delenv("FLASH_ATTN_METAL_STRICT", raising=False)
    monkeypatch.delenv("FLASH_ATTN_METAL_BACKEND", raising=False)
    flash_attn_metal.reset_stats()
    fastpath.clear()  # no stand-in launch outlives its test
    yield
    fastpath.clear()


def inputs():
    return torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)


def problem(dropout_p=0.0) -> AttentionProblem:
    q, k, v = inputs()
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=8**-0.5, causal=False, window_left=-1, window_right=-1,
                            softcap=0.0, alibi_slopes=None, dropout_p=dropout_p)


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """A dispatch module that supports everything but ALiBi and records what routing asks of it."""
    calls = []

    def unsupported_reason(p, needs_grad):
        calls.append(("unsupported_reason", needs_grad))
        return "ALiBi is not in the stand-in" if p.alibi_slopes is not None else None

    def forward_launch(p, backend_name):
        def launch(q, k, v, side_buffers=()):
            calls.append(("forward", backend_name))
            lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1])
            return torch.full_like(q, 7.0), lse, torch.zeros(*lse.shape, 2)

        return launch

    monkeypatch.setattr(routing, "kernels", lambda: types.SimpleNamespace(
        unsupported_reason=unsupported_reason, forward_launch=forward_launch, side_buffers=lambda p: []))
    return calls


def test_cpu_tensors_fall_back_with_one_warning_per_reason():
    with pytest.warns(RuntimeWarning, match="the tensors are on cpu") as caught:
        flash_attn_func(*inputs())
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into the package
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call with the same reason is silent
        flash_attn_func(*inputs())
    (reason, count), = flash_attn_metal.stats()["fallbacks"].items()
    assert "cpu" in reason and "FLASH_ATTN_METAL_BACKEND=emulator" in reason and count == 2


def test_mps_setting_on_cpu_tensors_falls_back_too(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "mps")
    with pytest.warns(RuntimeWarning, match="the tensors are on cpu"):
        flash_attn_func(*inputs())


def test_reference_backend_is_silent(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flash_attn_func(*inputs())
    assert flash_attn_metal.stats()["fallbacks"] == {}


def test_strict_mode_turns_fallbacks_into_errors(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    flash_attn_func(*inputs())  # asked for: not a fallback
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "auto")
    with pytest.raises(NotImplementedError, match="the tensors are on cpu"):
        flash_attn_func(*inputs())
    assert list(flash_attn_metal.stats()["fallbacks"].values()) == [1]


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "metal")
    with pytest.raises(ValueError, match="FLASH_ATTN_METAL_BACKEND must be one of"):
        flash_attn_func(*inputs())


def test_emulator_setting_runs_supported_calls_on_the_kernels(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = flash_attn_func(*inputs())
    assert (out == 7).all() and stand_in_kernels == [("unsupported_reason", False), ("forward", "emulator")]
    assert flash_attn_metal.stats()["fallbacks"] == {}


def test_what_the_kernels_refuse_falls_back_naming_their_reason(monkeypatch, stand_in_kernels):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    with pytest.warns(RuntimeWarning, match="ALiBi is not in the stand-in"):
        out = flash_attn_func(*inputs(), alibi_slopes=torch.rand(2))
    assert not (out == 7).all() and ("forward", "emulator") not in stand_in_kernels
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    with pytest.raises(NotImplementedError, match="ALiBi is not in the stand-in"):
        flash_attn_func(*inputs(), alibi_slopes=torch.rand(2))


def test_needs_grad_is_passed_to_the_kernels(stand_in_kernels):
    with pytest.warns(RuntimeWarning, match="on cpu"):
        assert routing.choose(problem(), needs_grad=True) is None  # cpu under auto: the reference
    assert stand_in_kernels == []  # the kernels are not even asked about tensors they cannot run
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
        assert routing.choose(problem(), needs_grad=True) == "emulator"
    assert stand_in_kernels == [("unsupported_reason", True)]


def test_the_real_kernels_run_dropout_and_return_s_dmask(monkeypatch):
    """Dropout runs in the kernels (strict: no fallback), and S_dmask comes back with it."""
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    out, lse, s_dmask = flash_attn_func(*inputs(), dropout_p=0.1, return_attn_probs=True)
    assert out.shape == (1, 4, 2, 8) and s_dmask.shape == (1, 2, 128, 128)
    assert any("_dropout" in name for name in flash_attn_metal.stats()["launches"])


def test_reset_stats_clears_counters():
    with pytest.warns(RuntimeWarning):
        flash_attn_func(*inputs())
    assert flash_attn_metal.stats()["fallbacks"]
    flash_attn_metal.reset_stats()
    assert flash_attn_metal.stats() == {"launches": {}, "compiles": 0, "cache_hits": {"memory": 0, "disk": 0},
                                        "fallbacks": {}}


def test_kvcache_attention_runs_on_the_kernels_and_matches_the_reference(monkeypatch):
    torch.manual_seed(1)
    q = torch.randn(2, 3, 4, 32, dtype=torch.float16)
    caches = [torch.randn(3, 16, 2, 32, dtype=torch.float16) for _ in range(2)]
    new = torch.randn(2, 3, 2, 32, dtype=torch.float16)
    args = dict(cache_seqlens=torch.tensor([4, 9], dtype=torch.int32), cache_leftpad=torch.tensor([1, 0], dtype=torch.int32),
                cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32), causal=True, return_softmax_lse=True)
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    ref_caches = [c.clone() for c in caches]
    ref_out, ref_lse = flash_attn_metal.flash_attn_with_kvcache(q, *ref_caches, new, new, **args)
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    out, lse = flash_attn_metal.flash_attn_with_kvcache(q, *caches, new, new, **args)
    assert flash_attn_metal.stats()["launches"] and all(torch.equal(a, b) for a, b in zip(caches, ref_caches))
    assert (out.float() - ref_out.float()).abs().max() < 1e-3 and (lse - ref_lse).abs().max() < 1e-4


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), (" TRUE ", True), ("0", False), ("false", False),
                                       ("False", False), ("", False), (None, False)])
def test_on_off_variables_read_alike(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(settings.STRICT, raising=False)
    else:
        monkeypatch.setenv(settings.STRICT, value)
    assert settings.flag(settings.STRICT) is on and routing.strict() is on
