"""Serve `import flash_attn` from flash-attn-metal where no real flash-attn is installed.

Installed by `flash_attn_metal_alias.pth`, so it runs at every interpreter start: it imports nothing but the
standard library and only appends a finder to `sys.meta_path`. Appended last, the finder is asked only after
every normal finder failed to find `flash_attn`, so a real (CUDA) flash-attn always wins.

On by default on macOS; `FLASH_ATTN_METAL_SHIM=0` turns it off, `FLASH_ATTN_METAL_SHIM=1` turns it on elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

# flash-attn's module names and the modules that serve them.
ALIASES = {
    "flash_attn": "flash_attn_metal",
    "flash_attn.flash_attn_interface": "flash_attn_metal.interface",
    "flash_attn.bert_padding": "flash_attn_metal.bert_padding",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        alias = ALIASES.get(fullname)
        if alias is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, _AliasLoader(alias))
        if fullname == "flash_attn":
            spec.submodule_search_locations = []  # a package, so that flash_attn.<sub> imports resolve here
        return spec


def enabled() -> bool:
    setting = os.environ.get("FLASH_ATTN_METAL_SHIM", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return sys.platform == "darwin"


def install() -> None:
    if enabled() and not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())
