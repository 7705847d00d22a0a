"""The selftest's report: what ran where, each check's result, and the timings; as JSON and as markdown for
pasting into an issue."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._version import __version__

SECTIONS = {
    "conformance": "Emulator conformance kernels",
    "attention": "Attention grid against the CPU reference",
    "timing": "Timing against torch SDPA",
}


@dataclass
class Check:
    section: str  # a key of SECTIONS
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    backend: str  # "mps" or "emulator"
    quick: bool
    environment: dict
    checks: list[Check] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)  # bench.Row fields
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str, section: str | None = None) -> int:
        return sum(c.status == status and section in (None, c.section) for c in self.checks)

    @property
    def failed(self) -> bool:
        return self.count("fail") > 0


def describe_error(exc: BaseException) -> str:
    """An exception in one line: its type and its message's first line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def environment() -> dict:
    """Versions, the Metal device and the tile table in force."""
    from ..kernels import tuning
    from ..runtime.device import detect

    info = detect()
    device = None if info is None else {
        "name": info.name, "chip": info.chip, "gpu_family": info.family, "gpu_cores": info.gpu_cores,
        "macos": info.macos, "metal_language": info.metal_language, "notes": list(info.notes)}
    return {"flash_attn_metal": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "os": platform.platform(), "machine": platform.machine(), "metal_device": device,
            "tile_table": tuning.describe()}


def write(report: Report, path: Path) -> tuple[Path, Path]:
    """JSON at `path`, markdown beside it (`path` with the suffix .md; a .md `path` puts the JSON at .json)."""
    json_path = path.with_suffix(".json") if path.suffix == ".md" else path
    markdown_path = json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(asdict(report), indent=1) + "\n")
    markdown_path.write_text(markdown(report))
    return json_path, markdown_path


def headline(report: Report) -> str:
    total = len(report.checks)
    failed, skipped = report.count("fail"), report.count("skip")
    verdict = f"{failed} of {total} checks FAILED" if failed else f"all {total - skipped} checks passed"
    return f"flash-attn-metal selftest on {report.backend}: {verdict}" + (f", {skipped} skipped" if skipped else "")


def markdown(report: Report) -> str:
    env = report.environment
    device = env["metal_device"]
    lines = [f"## {headline(report)}", "", "| | |", "| --- | --- |",
             f"| flash-attn-metal | {env['flash_attn_metal']} |", f"| torch | {env['torch']} |",
             f"| python | {env['python']} |", f"| os | {env['os']} ({env['machine']}) |"]
    if device is not None:
        cores = f", {device['gpu_cores']} GPU cores" if device["gpu_cores"] else ""
        lines += [f"| GPU | {device['name']} ({device['gpu_family']}{cores}) |",
                  f"| macOS | {device['macos']} (Metal {device['metal_language']}) |"]
    lines += [f"| ran on | {report.backend}{' (--quick)' if report.quick else ''}, {report.seconds:.0f} s |",
              f"| tile table | {env['tile_table']} |", ""]
    lines += [f"- {note}" for note in report.notes] + ([""] if report.notes else [])
    for section, title in SECTIONS.items():
        checks = [c for c in report.checks if c.section == section]
        if not checks:
            continue
        counts = ", ".join(f"{report.count(s, section)} {word}" for s, word in
                           (("pass", "passed"), ("fail", "failed"), ("skip", "skipped")) if report.count(s, section))
        lines += [f"### {title}: {counts}", ""]
        listed = [f"- **{c.status.upper()}** `{c.name}`: {c.detail}" for c in checks if c.status != "pass"]
        lines += listed + ([""] if listed else [])
    if report.timings:
        lines += ["### Timings (ms; speed-up over SDPA)", "",
                  "| dtype | N | d | causal | mode | flash-attn-metal | SDPA | SDPA math | speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for ours in (r for r in report.timings if r["impl"] == "flash-attn-metal"):
            same = {r["impl"]: r["ms"] for r in report.timings if all(
                r[k] == ours[k] for k in ("dtype", "seqlen", "head_dim", "causal", "mode"))}
            lines.append(f"| {ours['dtype']} | {ours['seqlen']} | {ours['head_dim']} | {ours['causal']} | "
                         f"{ours['mode']} | {ours['ms']:.3f} | {same.get('sdpa', float('nan')):.3f} | "
                         f"{same.get('sdpa-math', float('nan')):.3f} | {ours['speedup_vs_sdpa']:.2f}x |")
        lines.append("")
    return "\n".join(lines)
