"""`python -m flash_attn_metal info | demo | cache | bench` and the help (selftest and tune: test_selftest.py,
test_tune.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from flash_attn_metal.cli import main


def test_info_reports_versions_backend_and_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flash-attn-metal", "torch", "os", "device", "gpu family", "backend setting", "MPS tensors",
                "CPU tensors", "tile table", "flash_attn alias", "native features"):
        assert key in out
    assert str(tmp_path) in out


def info_rows(capsys) -> dict[str, str]:
    assert main(["info"]) == 0
    return {line[:17].strip(): line[17:].strip() for line in capsys.readouterr().out.splitlines()}


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="what runs where off a Mac")
def test_info_says_what_runs_cpu_tensors_by_default_and_with_the_emulator(capsys, monkeypatch):
    monkeypatch.delenv("FLASH_ATTN_METAL_BACKEND", raising=False)
    rows = info_rows(capsys)
    assert rows["MPS tensors"] == "no MPS device here"
    assert rows["CPU tensors"].startswith("the PyTorch reference (exact, no kernels); with FLASH_ATTN_METAL_BACKEND="
                                          "emulator, the Metal kernels in the CPU emulator: about 0.1 GFLOP/s")
    assert rows["tile table"].startswith("built-in") or rows["tile table"].startswith("tuned on this machine")
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    assert info_rows(capsys)["CPU tensors"].startswith("the Metal kernels in the CPU emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    assert info_rows(capsys)["CPU tensors"].startswith("the PyTorch reference (exact, no kernels): FLASH_ATTN")


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


def test_every_command_and_cache_action_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("info", "demo", "selftest", "tune", "bench", "kernels", "cache"):
        assert re.search(rf"^    {command} +\w", out, re.MULTILINE), command
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    out = capsys.readouterr().out
    for action in ("info", "clear", "warm"):
        assert re.search(rf"^    {action} +\w", out, re.MULTILINE), action
    assert main(["cache"]) == 2 and "ACTION" in capsys.readouterr().out  # no action: the help, not a traceback


BENCH = ["bench", "--seqlens", "32", "--head-dims", "32", "--heads", "2", "--causal", "yes", "--repeats", "1"]


def test_bench_runs_the_sizes_asked_for_in_the_emulator_with_a_line_per_configuration(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flash_attn_metal", *BENCH, "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "EMULATOR timings" in result.stdout
    assert re.search(r"^\[1/1\] float16 N=32 d=32 causal: forward [\d.]+ ms \(SDPA [\d.]+ ms, [\d.]+x\); backward",
                     result.stdout, re.MULTILINE)
    assert "FA MB" not in result.stdout and "vs SDPA" not in result.stdout  # no report or table unasked
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert rows[0].startswith("device,impl,mode,dtype,seqlen")
    assert len(rows) == 1 + 3 * 3  # one configuration x modes x implementations
    assert {r.split(",")[1] for r in rows[1:]} == {"flash-attn-metal", "sdpa", "sdpa-math"}


def test_bench_prints_the_table_on_request_and_says_when_there_is_no_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.delenv("FLASH_ATTN_METAL_BACKEND", raising=False)
    assert main([*BENCH, "--out", str(tmp_path), "--table", "--kernel-report"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^impl +mode +dtype .* vs SDPA", out, re.MULTILINE)
    assert "FA MB" in out  # the static kernel report, asked for
    assert out.rstrip().endswith("no plot: matplotlib is not installed (pip install 'flash-attn-metal[bench]')")
    assert "FLASH_ATTN_METAL_BACKEND" not in os.environ  # the emulator setting was for the run only


@pytest.mark.parametrize("option, value, message", [
    ("--repeats", "0", "must be a positive integer, got 0"), ("--seqlens", "-5", "must be a positive integer"),
    ("--head-dims", "300", "must be between 1 and 256"), ("--dtypes", "fp8", "invalid choice: 'fp8'"),
    ("--repeats", "two", "must be a positive integer, got 'two'"),
])
def test_bench_rejects_bad_options_naming_them(capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err and "Traceback" not in err


def test_bench_harness_refuses_zero_repeats():
    from flash_attn_metal import bench

    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        bench.run("cpu", bench.EMULATOR_SIZES, 0, lambda *a: None)


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
