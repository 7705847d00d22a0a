"""`import flash_attn` resolves to flash-attn-metal through the .pth-installed finder (each check in a fresh
interpreter), only where enabled, never over a real flash-attn, and without importing anything heavy at start.

These run in the environment the package is pip-installed into (`make test` installs it editable); the wheel
test builds a regular wheel and runs it without any other install of the package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import flash_attn_metal

ROOT = Path(__file__).resolve().parents[1]
API_VERSION = "2.8.3"  # the flash-attn version whose API the alias serves


def python(code: str, shim: str, extra_path: str | None = None, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASH_ATTN_METAL_SHIM": shim}
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, *args, "-c", code], env=env, capture_output=True, text=True, cwd="/")


def test_alias_serves_flash_attn_when_enabled():
    code = (
        "import sys\n"
        "assert 'torch' not in sys.modules and 'flash_attn_metal' not in sys.modules, 'the .pth imported too much'\n"
        "from flash_attn import flash_attn_func\n"
        "import flash_attn, flash_attn.bert_padding, flash_attn.flash_attn_interface as fi, flash_attn_metal\n"
        "assert flash_attn_func is flash_attn_metal.flash_attn_func\n"
        "assert fi.flash_attn_varlen_func is flash_attn_metal.flash_attn_varlen_func\n"
        "assert fi.flash_attn_with_kvcache is flash_attn_metal.flash_attn_with_kvcache\n"
        "assert flash_attn.bert_padding.unpad_input is flash_attn_metal.bert_padding.unpad_input\n"
        "assert flash_attn.flash_attn_interface is fi\n"
        "print(flash_attn.__version__, flash_attn_metal.__version__)"
    )
    result = python(code, "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [API_VERSION, flash_attn_metal.__version__]


def test_alias_serves_the_names_flash_attn_code_imports():
    """What flash-attn's own tests and libraries (diffusers, ring attention) import, beyond the seven functions."""
    code = (
        "from flash_attn.flash_attn_interface import _get_block_size_n, USE_TRITON_ROCM\n"
        "from flash_attn.flash_attn_interface import (_flash_attn_forward, _flash_attn_backward,\n"
        "    _flash_attn_varlen_forward, _flash_attn_varlen_backward, _wrapped_flash_attn_forward,\n"
        "    _wrapped_flash_attn_backward, _wrapped_flash_attn_varlen_forward, _wrapped_flash_attn_varlen_backward)\n"
        "from flash_attn.layers.rotary import apply_rotary_emb, apply_rotary_emb_qkv_, apply_rotary_emb_kv_\n"
        "from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb_torch\n"
        "import flash_attn.layers, flash_attn_metal.layers.rotary as ours, flash_attn_metal.flash_attn_interface as fi\n"
        "assert apply_rotary_emb is ours.apply_rotary_emb and RotaryEmbedding is ours.RotaryEmbedding\n"
        "assert _flash_attn_varlen_backward is fi._flash_attn_varlen_backward and USE_TRITON_ROCM is False\n"
        "assert flash_attn.layers.rotary is __import__('sys').modules['flash_attn.layers.rotary']\n"
        "print(_get_block_size_n('cpu', 64, False, True))\n"
    )
    result = python(code, "1")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0
    missing = python("from flash_attn.layers.rotary import no_such_name", "1")
    assert missing.returncode != 0 and "cannot import name 'no_such_name'" in missing.stderr


def test_alias_leaves_flash_attn_metal_itself_untouched():
    code = (
        "import flash_attn, flash_attn.bert_padding, sys, flash_attn_metal\n"
        "assert flash_attn is not flash_attn_metal and flash_attn.__path__ == []\n"
        "assert flash_attn_metal.__spec__.name == 'flash_attn_metal'\n"
        "assert flash_attn_metal.bert_padding is sys.modules['flash_attn_metal.bert_padding']\n"
        "assert flash_attn_metal.bert_padding.__name__ == 'flash_attn_metal.bert_padding'\n"
        "try:\n"
        "    import flash_attn.routing\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('flash_attn.routing must not load a second copy of a module')\n"
    )
    result = python(code, "1")
    assert result.returncode == 0, result.stderr


def test_find_spec_sees_the_alias_but_package_metadata_does_not():
    code = (
        "import importlib.util, importlib.metadata\n"
        "assert importlib.util.find_spec('flash_attn') is not None\n"
        "try:\n"
        "    importlib.metadata.version('flash_attn')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    print('no flash-attn distribution claimed')\n"
    )
    result = python(code, "1")
    assert result.returncode == 0 and "no flash-attn distribution claimed" in result.stdout, result.stderr


def test_alias_is_off_when_disabled():
    result = python("import flash_attn", "0")
    assert result.returncode != 0 and "No module named 'flash_attn'" in result.stderr
    enabled = python("import flash_attn", "1")
    assert enabled.returncode == 0, enabled.stderr


def test_a_real_flash_attn_wins(tmp_path):
    real = tmp_path / "flash_attn"
    real.mkdir()
    (real / "__init__.py").write_text("REAL = True\n")
    code = (
        "import flash_attn\n"
        "print(flash_attn.REAL)\n"
        "try:\n"
        "    import flash_attn.bert_padding\n"  # not in this real package: never filled in from flash-attn-metal
        "except ModuleNotFoundError:\n"
        "    print('no mixing')\n"
    )
    result = python(code, "1", str(tmp_path))
    assert result.returncode == 0 and result.stdout.split() == ["True", "no", "mixing"], result.stderr


def test_a_regular_wheel_installs_the_pth_at_the_top_of_site_packages(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves the work tree alone
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        assert "flash_attn_metal_alias.pth" in zf.namelist() and "_flash_attn_metal_alias.py" in zf.namelist()
        zf.extractall(installed)
    # No site: neither this environment's install of the package nor its .pth files; torch from site-packages.
    code = (
        f"import sys, site; sys.path += {site.getsitepackages()!r}\n"
        "assert 'flash_attn_metal' not in str(sys.meta_path)\n"
        f"site.addsitedir({str(installed)!r})  # processes the wheel's .pth, as site-packages would\n"
        "import flash_attn, flash_attn_metal\n"
        f"assert flash_attn_metal.__file__.startswith({str(installed)!r}), flash_attn_metal.__file__\n"
        "print(flash_attn.__version__)"
    )
    result = python(code, "1", args=("-S",))
    assert result.returncode == 0 and result.stdout.strip() == API_VERSION, result.stderr
