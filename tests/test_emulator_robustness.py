"""The CPU emulator as a process component: it survives fork, keeps its memory flat over many launches and many
short-lived threads, validates its settings, says in one line when it has no working compiler, and builds with
fast math on request. Each failing case is paired with a passing one."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from emulator_support import HEADER
from flash_attn_metal import settings
from flash_attn_metal.emulator import EmulatorUnavailable, compile_shader
from flash_attn_metal.runtime.backend import get_backend
from flash_attn_metal.stats import stats

SRC = str(Path(__file__).resolve().parents[1] / "src")

ADD_ONE = HEADER + """
kernel void add_one(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) { x[i] += 1.0f; }
"""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


# ---- fork ----

FORK = r"""
import os, sys, torch
from flash_attn_metal.emulator import compile_shader
lib = compile_shader(sys.argv[1])
x = torch.zeros(256)
lib.add_one(x, threads=[256], group_size=[32])     # 8 threadgroups over the pool's 2 threads
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(100)  # a hung child ends rather than outlive the test
    lib.add_one(x, threads=[256], group_size=[32])  # the child's own pool
    os._exit(0 if x.eq(2).all() else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
lib.add_one(x, threads=[256], group_size=[32])      # the parent's pool still works
assert x.eq(2).all()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_multi_threadgroup_launches():
    env = {**os.environ, settings.EMULATOR_THREADS: "2",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", FORK, ADD_ONE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ---- memory ----

@linux_only
def test_many_launches_keep_memory_flat():
    lib = compile_shader(ADD_ONE)
    x = torch.zeros(64)
    for _ in range(200):  # warm up: workspaces, allocator pools
        lib.add_one(x, threads=[64], group_size=[32])
    before = _status_kib("VmRSS")
    for _ in range(5000):
        lib.add_one(x, threads=[64], group_size=[32])
    assert x.eq(5200).all()
    assert _status_kib("VmRSS") - before < 12 * 1024  # a leak of 9 KiB per launch would be 44 MiB


@linux_only
def test_short_lived_threads_leave_no_fiber_stacks():
    lib = compile_shader(ADD_ONE)
    x = torch.zeros(1024)

    def one_launch():
        lib.add_one(x, threads=[1024], group_size=[1024])  # one threadgroup: runs in the calling thread

    one_launch()
    before = _status_kib("VmSize")
    for _ in range(20):
        t = threading.Thread(target=one_launch)
        t.start()
        t.join()
    assert x.eq(21).all()
    # Left behind, each thread's 1024 fiber stacks would map 256 MiB: 5 GiB in all. New threads' own stacks and
    # malloc arenas account for the rest.
    assert _status_kib("VmSize") - before < 1024 * 1024


# ---- FLASH_ATTN_METAL_EMULATOR_THREADS ----

@pytest.mark.parametrize("value", ["-1", "0", "two", "1.5"])
def test_a_bad_thread_count_is_refused_before_anything_runs(monkeypatch, value):
    library = get_backend("emulator").compile(ADD_ONE)
    x = torch.zeros(128)
    monkeypatch.setenv(settings.EMULATOR_THREADS, "2")
    library.add_one(x, threads=[128], group_size=[32])
    assert x.eq(1).all()
    launches = stats()["launches"].get("add_one", 0)
    monkeypatch.setenv(settings.EMULATOR_THREADS, value)
    with pytest.raises(ValueError, match=f"FLASH_ATTN_METAL_EMULATOR_THREADS must be a positive integer.*'{value}'"):
        library.add_one(x, threads=[128], group_size=[32])
    assert x.eq(1).all() and stats()["launches"].get("add_one", 0) == launches


# ---- FLASH_ATTN_METAL_CXX ----

def _fresh_source(tag: str) -> str:
    """A kernel no cache holds yet, so that the compiler runs."""
    body = f"x[0] = {len(tag)}.0f; /* {tag} {os.getpid()} */"
    return HEADER + f"kernel void k(device float* x [[buffer(0)]]) {{ {body} }}\n"


def _fake_compiler(tmp_path: Path, script: str) -> str:
    path = tmp_path / "fake-c++"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "fails --version", "cannot compile"])
def test_a_broken_compiler_is_one_line_naming_the_setting(monkeypatch, tmp_path, kind):
    monkeypatch.setenv(settings.CACHE_DIR, str(tmp_path / "cache"))
    compile_shader(_fresh_source(f"good {kind}"))  # the default compiler works
    if kind == "missing":
        cxx = "/nonexistent/g++"
    elif kind == "fails --version":
        cxx = _fake_compiler(tmp_path, "exit 1\n")
    else:
        cxx = _fake_compiler(tmp_path, 'if [ "$1" = --version ]; then echo "fake 1.0"; exit 0; fi\n'
                                       'echo "fake: internal error" >&2; exit 1\n')
    monkeypatch.setenv(settings.CXX, cxx)
    with pytest.raises(EmulatorUnavailable) as info:
        compile_shader(_fresh_source(f"bad {kind}"))
    message = str(info.value)
    assert "\n" not in message and "FLASH_ATTN_METAL_CXX" in message and cxx in message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


# ---- FLASH_ATTN_METAL_EMULATOR_FAST_MATH ----

CLASSIFY = HEADER + """
kernel void classify(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  out[i] = float(isnan(x[i])) + 2.0f * float(isinf(x[i]));
}
"""


def test_fast_math_builds_are_a_backend_of_their_own_and_fold_nan_checks(monkeypatch):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    out = torch.empty(4)
    monkeypatch.delenv(settings.EMULATOR_FAST_MATH, raising=False)
    normal = get_backend("emulator")
    normal.compile(CLASSIFY).classify(x, out)
    assert out.tolist() == [1.0, 2.0, 2.0, 0.0]  # IEEE: the checks see NaN and infinity
    monkeypatch.setenv(settings.EMULATOR_FAST_MATH, "1")
    fast = get_backend("emulator")
    assert fast is not normal and fast is get_backend("emulator")
    fast.compile(CLASSIFY).classify(x, out)
    assert out.tolist() == [0.0, 0.0, 0.0, 0.0]  # fast math assumes neither exists: the checks fold away
