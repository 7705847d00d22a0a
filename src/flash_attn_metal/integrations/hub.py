"""`python -m flash_attn_metal export-hub DIR`: flash-attn-metal as a Hugging Face kernels-hub kernel.

It writes a pure-Python Metal build variant, as the `kernels` library loads it (kernel-requirements.md):

    DIR/build/torch-metal/
        metadata.json        id, name, version, license, backend {"type": "metal"}, python-depends, digest
        __init__.py          the kernel's API: flash-attn's functions and its `flash_attn_interface` module; the
                             three that transformers calls also take its `s_aux` (attention sinks) keyword
        flash_attn_metal/    a copy of this package (kernel generator, runtime, emulator): the whole kernel, and
                             the compatibility directory named after the kernel that older `kernels` import

The copy imports only the standard library, torch and itself (relative imports; no import hook), so the build
runs wherever `kernels` loads it, flash-attn-metal installed or not: on a Mac on MPS, elsewhere in the Metal
emulator (FLASH_ATTN_METAL_BACKEND=emulator). `kernels` imports it under its metadata id, which names its torch
ops too, so it loads beside an installed flash-attn-metal. Load it with

    kernels.get_local_kernel(Path("DIR/build/torch-metal"))
    LOCAL_KERNELS="<org>/<repo>=DIR/build/torch-metal"   # then get_kernel("<org>/<repo>"), or transformers'
                                                          # attn_implementation="<org>/<repo>"

or upload DIR as a kernel repository (a `v1` branch) and use `get_kernel("<org>/<repo>", version=1)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

from .._version import __version__

NAME = "flash-attn-metal"
PACKAGE = NAME.replace("-", "_")  # the package copy's directory, also the compatibility directory
KERNEL_VERSION = 1  # the hub's major version (a `v1` branch): bump on any change of the exported API
LICENSE = "BSD-3-Clause"
VARIANT = "torch-metal"  # pure Python, Metal backend, any torch version ("noarch")
# Not part of the kernel: the command line, the benchmark harness and these integrations.
LEFT_OUT = ("integrations", "cli.py", "__main__.py", "bench.py", "__pycache__", "*.pyc")
EXPORTED = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
            "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]

INIT = '''"""flash-attn-metal {version} as a kernels-hub kernel: flash-attn 2.8's functions over Metal kernels generated
at run time (on MPS tensors; elsewhere through the Metal emulator with FLASH_ATTN_METAL_BACKEND=emulator).

Written by `python -m flash_attn_metal export-hub`; the kernel is the package in {package}/."""

import functools
import inspect

from . import {package}
from .{package} import flash_attn_interface
from .{package} import (
{imports}
)


def _with_s_aux(function):
    """`function` with transformers' `s_aux` keyword (per-head attention-sink logits, e.g. gpt-oss), passed on
    as `sinks`: transformers hands a hub kernel the sinks only where its functions declare `s_aux`."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args, s_aux=None, **kwargs):
        if s_aux is not None:
            kwargs["sinks"] = s_aux.float()
        return function(*args, **kwargs)

    s_aux = inspect.Parameter("s_aux", inspect.Parameter.KEYWORD_ONLY, default=None)
    call.__signature__ = signature.replace(parameters=[*signature.parameters.values(), s_aux])
    return call


{wrapped}

__all__ = [
{names}
]
'''
# What transformers calls a hub kernel's attention through: these take its `s_aux` keyword.
WITH_S_AUX = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"]


def variant_dir(directory: Path) -> Path:
    return Path(directory) / "build" / VARIANT


def export(directory: Path) -> Path:
    """Write the build variant under `directory` (replacing an earlier export there); returns its path."""
    target = variant_dir(directory)
    if target.exists():
        _check_earlier_export(target)
        shutil.rmtree(target)
    source = Path(__file__).resolve().parents[1]
    shutil.copytree(source, target / PACKAGE, ignore=shutil.ignore_patterns(*LEFT_OUT))
    names = EXPORTED + ["flash_attn_interface"]
    (target / "__init__.py").write_text(INIT.format(
        version=__version__, package=PACKAGE,
        imports="\n".join(f"    {name}," for name in EXPORTED if name not in WITH_S_AUX),
        wrapped="\n".join(f"{name} = _with_s_aux({PACKAGE}.{name})" for name in WITH_S_AUX),
        names="\n".join(f'    "{name}",' for name in names)))
    files = _digest(target)
    metadata = {
        # A Python module name unique to this build: kernels imports the build, and names its torch ops, by it.
        "id": f"_{PACKAGE}_{__version__.replace('.', '_')}_{_fingerprint(files)}",
        "name": NAME,
        "version": KERNEL_VERSION,
        "license": LICENSE,
        "backend": {"type": "metal"},
        "python-depends": [],
        "digest": {"algorithm": "sha256", "files": files},
    }
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return target


def _check_earlier_export(target: Path) -> None:
    """Refuse to replace a directory that is not an earlier export."""
    try:
        name = json.loads((target / "metadata.json").read_text()).get("name")
    except (OSError, ValueError):
        name = None
    if name != NAME:
        raise FileExistsError(f"{target} exists and is not a flash-attn-metal hub build; remove it or choose another "
                              "directory")


def _digest(variant: Path) -> dict[str, str]:
    """The kernels hub's file digest: base64 SHA-256 of every file but metadata.json, by POSIX relative path."""
    files = {}
    for path in sorted(variant.rglob("*")):
        relative = path.relative_to(variant).as_posix()
        if path.is_file() and relative != "metadata.json" and "__pycache__" not in path.parts:
            files[relative] = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
    return files


def _fingerprint(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:10]
