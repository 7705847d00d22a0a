"""`selftest`: off a Mac it runs the conformance kernels, the attention grid and the timings in the emulator and
writes the report; a wrong result fails its check and the exit status. The GPU-against-emulator comparison is
checked on emulator outputs standing in for a GPU's."""

from __future__ import annotations

import json

import pytest
import torch

from flash_attn_metal.cli import main
from flash_attn_metal.kernels import launch
from flash_attn_metal.selftest import attention, conformance, runner
from flash_attn_metal.selftest.report import Check, Report, write


def test_quick_selftest_runs_every_section_in_the_emulator_and_writes_both_reports(tmp_path, capsys):
    assert main(["selftest", "--quick", "--report", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "selftest on the CPU emulator" in out and "checks passed" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["backend"] == "emulator" and report["quick"]
    assert report["environment"]["flash_attn_metal"] and report["environment"]["metal_device"] is None
    sections = {c["section"] for c in report["checks"]}
    assert sections == {"conformance", "attention", "timing"}
    assert all(c["status"] == "pass" for c in report["checks"]), [c for c in report["checks"] if c["status"] != "pass"]
    assert len([c for c in report["checks"] if c["section"] == "conformance"]) == len(conformance.CASES)
    assert {c["name"] for c in report["checks"] if c["section"] == "attention"} == \
        {case.name for case in attention.grid(quick=True)}
    functions = {case.function for case in attention.grid(quick=True)}
    assert functions == set(attention.FUNCTIONS)  # every public function, even in the quick grid
    assert {r["impl"] for r in report["timings"]} == {"flash-attn-metal", "sdpa", "sdpa-math"}
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("## flash-attn-metal selftest on emulator: all") and "emulator timings" in markdown


def test_a_wrong_kernel_result_fails_its_check_and_the_exit_status(monkeypatch, tmp_path):
    case = attention.AttentionCase("flash_attn_func", "fp16", 64, "causal")
    monkeypatch.setattr(attention, "grid", lambda quick: [case])
    monkeypatch.setattr(conformance, "CASES", conformance.CASES[:1])
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    original = launch.ForwardLaunch.__call__

    def off_by_a_little(self, *args, **kwargs):
        out, lse, stats = original(self, *args, **kwargs)
        return out + 0.01, lse, stats

    monkeypatch.setattr(launch.ForwardLaunch, "__call__", off_by_a_little)
    lines = []
    assert runner.main(True, tmp_path / "r.json", lines.append) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    (failed,) = [c for c in report["checks"] if c["status"] == "fail"]
    assert failed["name"] == case.name and failed["detail"].startswith("out ")
    assert "1 of 3 checks FAILED" in lines[-2]
    assert f"**FAIL** `{case.name}`: out " in (tmp_path / "r.md").read_text()


def test_a_call_that_falls_back_to_the_reference_is_a_failure(monkeypatch):
    case = attention.AttentionCase("flash_attn_func", "fp16", 32)
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    with pytest.raises(RuntimeError, match="kernels did not run"):
        attention.check(case, "cpu")
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    assert all(c.ok for c in attention.check(case, "cpu"))


def test_conformance_failures_name_the_output_and_element():
    outputs, expected = conformance.run(conformance.named("barrier"), "cpu")
    assert conformance.failures(outputs, expected, "cpu") == []
    outputs["reversed"][5] += 1.0
    (found,) = conformance.failures(outputs, expected, "cpu")
    assert found.startswith("reversed: element 5 is")


def test_negative_controls_and_emulator_only_checks():
    outputs, expected = conformance.run(conformance.named("removed_barrier"), "cpu")
    assert conformance.failures(outputs, expected, "cpu") == []
    assert conformance.failures(outputs, expected, "mps") == []  # a GPU's race result is not judged
    outputs["reversed"] = expected["reversed"].value.clone()  # as if the emulator had run the barrier anyway
    (found,) = conformance.failures(outputs, expected, "cpu")
    assert found == "reversed: matches the value a broken emulator would give"


def test_gpu_and_emulator_differences_are_reported_where_metal_defines_the_result():
    emulated, expected = conformance.run(conformance.named("math_functions"), "cpu")
    gpu = {name: t.clone() for name, t in emulated.items()}
    gpu["math"][0, 0] *= 1 + 1e-6  # within twice the expectation's tolerance: agreement
    assert conformance.differences(gpu, emulated, expected) == []
    gpu["math"][3, 6] += 1e-3
    (found,) = conformance.differences(gpu, emulated, expected)
    assert found.startswith("math: element 36 is") and "the emulator gave" in found
    garbage, expected = conformance.run(conformance.named("threadgroup_memory_starts_as_garbage"), "cpu")
    gpu = {name: torch.zeros_like(t) for name, t in garbage.items()}  # any value is Metal-conformant there
    assert conformance.differences(gpu, garbage, expected) == []


def test_report_paths_and_markdown(tmp_path):
    report = Report("mps", False, {"flash_attn_metal": "0.1.0", "torch": "2.13.0", "python": "3.12", "os": "macOS",
                                   "machine": "arm64", "tile_table": "built-in",
                                   "metal_device": {"name": "Apple M3 Max", "gpu_family": "apple9", "gpu_cores": 40,
                                                    "macos": "15.3", "metal_language": "3.2"}},
                    checks=[Check("attention", "a", "pass"), Check("attention", "b", "fail", "out 1e-1 (bound 1e-3)")])
    json_path, md_path = write(report, tmp_path / "summary.md")
    assert (json_path.name, md_path.name) == ("summary.json", "summary.md")
    text = md_path.read_text()
    assert "1 of 2 checks FAILED" in text and "| GPU | Apple M3 Max (apple9, 40 GPU cores) |" in text
    assert "- **FAIL** `b`: out 1e-1 (bound 1e-3)" in text and "`a`" not in text  # passes are counted, not listed
