"""Serve `import flash_attn` from flash-attn-metal where no real flash-attn is installed.

Installed by `flash_attn_metal_alias.pth`, so it runs at every interpreter start: it imports nothing but the
standard library and only appends a finder to `sys.meta_path`. Appended last, the finder is asked only after
every normal finder failed to find `flash_attn`, so a real (CUDA) flash-attn always wins.

On by default on macOS; `FLASH_ATTN_METAL_SHIM=0` turns it off, `FLASH_ATTN_METAL_SHIM=1` turns it on elsewhere.

What it serves: `flash_attn` (the seven functions, `bert_padding`, and `__version__` = the flash-attn API
version implemented, so version checks in callers pass), `flash_attn.flash_attn_interface` (with the private
functions libraries import), `flash_attn.bert_padding` and `flash_attn.layers.rotary`. Each is a module of its
own whose public names are flash-attn-metal's objects, so flash-attn-metal's modules are never imported twice or
renamed. `importlib.util.find_spec("flash_attn")` sees the alias; `importlib.metadata` does not (no `flash-attn`
distribution is claimed, so pip and transformers' version checks still know that the CUDA package is absent).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from importlib.machinery import ModuleSpec

FLASH_ATTN_API_VERSION = "2.8.3"
PACKAGE = "flash_attn"
# flash-attn's submodules and the flash-attn-metal modules whose `__all__` they serve.
SUBMODULES = {
    "flash_attn.flash_attn_interface": "flash_attn_metal.flash_attn_interface",
    "flash_attn.bert_padding": "flash_attn_metal.bert_padding",
    "flash_attn.layers": "flash_attn_metal.layers",
    "flash_attn.layers.rotary": "flash_attn_metal.layers.rotary",
}
SUBPACKAGES = {"flash_attn.layers"}  # served with a search path, so their submodules can be imported
_MARKER = "__flash_attn_metal_alias__"


# Plain classes with the import protocol's methods: importing importlib.abc (or typing) would cost every
# interpreter start ~10 ms.
class AliasLoader:
    """Fills a fresh module with the public names (`__all__`) of a flash-attn-metal module."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        target = importlib.import_module(self.target)
        module.__dict__.update({name: getattr(target, name) for name in getattr(target, "__all__", ())})
        setattr(module, _MARKER, self.target)
        if module.__name__ == PACKAGE:
            module.__version__ = FLASH_ATTN_API_VERSION
            for name in SUBMODULES:  # as flash-attn's __init__ does, so flash_attn.<sub> works after `import flash_attn`
                importlib.import_module(name)


class AliasFinder:
    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname == PACKAGE:
            # An empty search path: no file-system finder can load flash_attn.<anything> from it.
            return ModuleSpec(fullname, AliasLoader("flash_attn_metal"), is_package=True)
        if fullname in SUBMODULES and hasattr(sys.modules.get(PACKAGE), _MARKER):  # never inside a real flash_attn
            return ModuleSpec(fullname, AliasLoader(SUBMODULES[fullname]), is_package=fullname in SUBPACKAGES)
        return None


def enabled() -> bool:
    setting = os.environ.get("FLASH_ATTN_METAL_SHIM", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return sys.platform == "darwin"


def install() -> None:
    if enabled() and not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
