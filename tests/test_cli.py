"""`python -m flash_attn_metal info | demo | cache`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flash_attn_metal.cli import main


def test_info_reports_versions_backend_and_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flash-attn-metal", "torch", "os", "device", "gpu family", "backend setting", "flash_attn alias",
                "native features"):
        assert key in out
    assert str(tmp_path) in out


def test_demo_says_which_backend_ran_and_its_errors():
    result = subprocess.run([sys.executable, "-m", "flash_attn_metal", "demo"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "forward (inference): ran on Metal kernels via the emulator" in result.stdout
    assert "forward + backward (training): ran on Metal kernels via the emulator" in result.stdout
    error = float(result.stdout.split("max |out - fp32 reference| = ")[1].split()[0])
    assert error < 1e-2


def test_demo_without_a_cpp_compiler_runs_the_reference_and_says_so():
    env = {**os.environ, "PATH": "/nonexistent"}
    env.pop("FLASH_ATTN_METAL_BACKEND", None)
    env.pop("FLASH_ATTN_METAL_CXX", None)
    result = subprocess.run([sys.executable, "-m", "flash_attn_metal", "demo"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "the Metal emulator cannot run here" in result.stdout
    assert "forward + backward (training): ran on the PyTorch reference" in result.stdout


def test_demo_honours_the_backend_setting_and_leaves_it_as_it_was(capsys, monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "forward (inference): ran on the PyTorch reference" in out and "Metal kernels" not in out
    assert os.environ["FLASH_ATTN_METAL_BACKEND"] == "reference"


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_cache_warm_info_and_clear(tmp_path):
    env = {**__import__("os").environ, "FLASH_ATTN_METAL_CACHE_DIR": str(tmp_path)}

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "flash_attn_metal", "cache", *args], capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "0 entries" in cli("info")
    assert "warmed 56 kernel libraries" in cli("warm")
    assert "56 entries" in cli("info")
    assert "removed 56 entries" in cli("clear")
    assert "0 entries" in cli("info")


def test_bench_runs_the_harness_in_the_emulator_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flash_attn_metal", "bench", "--out", str(tmp_path), "--repeats", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "EMULATOR timings" in result.stdout
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert rows[0].startswith("device,impl,mode,dtype,seqlen")
    assert len(rows) == 1 + 2 * 2 * 3 * 3  # seqlens x causal x modes x implementations
    assert any(r.split(",")[1] == "flash-attn-metal" for r in rows[1:])


def test_bench_peak_memory_is_the_drivers_growth_over_one_step_from_an_empty_cache(monkeypatch):
    from flash_attn_metal import bench

    driver = {"bytes": 3 << 20, "events": []}  # 3 MiB cached before the step: emptied first

    def empty_cache():
        driver["events"].append("empty_cache")
        driver["bytes"] = 1 << 20  # the inputs stay allocated

    def step():
        driver["events"].append("step")
        driver["bytes"] += 8 << 20  # the step's high-water mark stays cached after it frees it

    monkeypatch.setattr(torch.mps, "synchronize", lambda: driver["events"].append("synchronize"))
    monkeypatch.setattr(torch.mps, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: driver["bytes"])
    assert bench._peak_mib(step, "mps") == 8.0
    assert driver["events"] == ["synchronize", "empty_cache", "step", "synchronize"]
    assert bench._peak_mib(step, "cpu") is None and driver["events"][-1] == "synchronize"  # not measured off MPS
