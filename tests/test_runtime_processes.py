"""The kernel cache across real processes, through `get_backend("emulator")` and the emulator's real compiler:
two processes warming one empty cache at once, a later process compiling nothing, a truncated entry rebuilt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
KERNEL = """#include <metal_stdlib>
using namespace metal;
kernel void fill(device float* o, constant float& v, uint i [[thread_position_in_grid]]) { o[i] = v; }
"""
SCRIPT = r"""
import json, sys, torch
from flash_attn_metal.runtime import get_backend
from flash_attn_metal.stats import stats
library = get_backend("emulator").compile(sys.argv[1])
out = torch.zeros(4)
library.fill(out, 2.5, threads=[4], group_size=[4])
assert out.tolist() == [2.5] * 4
print(json.dumps(stats()))
"""


def start(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "FLASH_ATTN_METAL_CACHE_DIR": str(cache),
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FLASH_ATTN_METAL_EMULATOR_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, KERNEL], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_processes_share_the_disk_tier(tmp_path):
    first, second = (finish(p) for p in [start(tmp_path), start(tmp_path)])  # at once, on an empty cache
    for stats in (first, second):
        assert stats["launches"] == {"fill": 1} and stats["compiles"] + stats["cache_hits"]["disk"] == 1
    (entry,) = (tmp_path / "emulator-cpu").iterdir()  # both wrote the same key; one whole entry remains
    later = finish(start(tmp_path))
    assert later["compiles"] == 0 and later["cache_hits"]["disk"] == 1
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated, as by a full disk or a crash
    rebuilt = finish(start(tmp_path))
    assert rebuilt["compiles"] == 1 and rebuilt["cache_hits"]["disk"] == 0
    assert finish(start(tmp_path))["compiles"] == 0
