"""`import flash_attn` resolves to flash-attn-metal through the .pth-installed finder (in a fresh interpreter),
only where enabled, and never over a real flash-attn."""

from __future__ import annotations

import os
import subprocess
import sys


def python(code: str, shim: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASH_ATTN_METAL_SHIM": shim}
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_alias_serves_flash_attn_when_enabled():
    code = (
        "import sys; assert 'torch' not in sys.modules, 'the .pth imported torch at start-up'\n"
        "from flash_attn import flash_attn_func\n"
        "import flash_attn, flash_attn.bert_padding, flash_attn.flash_attn_interface as fi, flash_attn_metal\n"
        "assert flash_attn_func is flash_attn_metal.flash_attn_func\n"
        "assert fi.flash_attn_varlen_func is flash_attn_metal.flash_attn_varlen_func\n"
        "assert flash_attn.bert_padding.unpad_input.__name__ == 'unpad_input'\n"
        "print(flash_attn.__version__)"
    )
    result = python(code, "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __import__("flash_attn_metal").__version__


def test_alias_is_off_when_disabled():
    result = python("import flash_attn", "0")
    assert result.returncode != 0 and "No module named 'flash_attn'" in result.stderr


def test_a_real_flash_attn_wins(tmp_path):
    real = tmp_path / "flash_attn"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    result = python("import flash_attn; print(flash_attn.REAL)", "1", str(tmp_path))
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
