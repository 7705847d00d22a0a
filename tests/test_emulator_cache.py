"""The emulator's compiled kernels go through the project's two-tier cache: a second process loads them from
disk and compiles nothing; a corrupt entry is rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import json, sys, torch
from flash_attn_metal.stats import stats
from flash_attn_metal.emulator import compile_shader
source = "#include <metal_stdlib>\nusing namespace metal;\n" + sys.argv[1]
lib = compile_shader(source)
out = torch.zeros(4)
lib.fill(out, 1.5)
assert out.tolist() == [1.5] * 4
print(json.dumps(stats()))
"""


def run(cache: Path, kernel: str) -> dict:
    env = {**os.environ, "FLASH_ATTN_METAL_CACHE_DIR": str(cache)}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", SCRIPT, kernel], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_second_process_compiles_nothing_and_corrupt_entries_are_rebuilt(tmp_path):
    kernel = "kernel void fill(device float* o, constant float& v, uint i [[thread_position_in_grid]]) { o[i] = v; }"
    first = run(tmp_path, kernel)
    assert first["compiles"] == 1 and first["cache_hits"]["disk"] == 0
    second = run(tmp_path, kernel)
    assert second["compiles"] == 0 and second["cache_hits"]["disk"] == 1
    (entry,) = (tmp_path / "emulator-cpu").iterdir()
    entry.write_bytes(entry.read_bytes()[:-7])  # truncated by a crash, say
    third = run(tmp_path, kernel)
    assert third["compiles"] == 1 and third["cache_hits"]["disk"] == 0
    assert run(tmp_path, kernel)["compiles"] == 0
