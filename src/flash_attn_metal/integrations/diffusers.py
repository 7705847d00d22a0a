"""flash-attn-metal behind diffusers' `flash` and `flash_varlen` attention backends.

    from flash_attn_metal.integrations import diffusers as metal_diffusers
    metal_diffusers.enable()
    pipe.transformer.set_attention_backend("flash")   # or "flash_varlen"; or `with attention_backend("flash"):`

diffusers refuses these backends unless `importlib.metadata` finds a flash-attn >= 2.6.3 distribution (the
`flash_attn` alias rightly claims none), and its backend registry is private. So `enable()` does the least that
works (tested against diffusers 0.42): in `diffusers.models.attention_dispatch` it marks flash-attn usable and
points the flash-attn names that module imported (`flash_attn_func`, `flash_attn_varlen_func`,
`_wrapped_flash_attn_forward`, `_wrapped_flash_attn_backward`) at flash-attn-metal's; `disable()` restores them.

The hub backends need no patching: after `python -m flash_attn_metal export-hub DIR`,
`LOCAL_KERNELS="kernels-community/flash-attn2=DIR/build/torch-metal"` makes diffusers' `flash_hub` and
`flash_varlen_hub` backends load the export (its `flash_attn_interface` has the private functions they call).
"""

from __future__ import annotations

from typing import Any

from .. import flash_attn_interface

# attention_dispatch's globals and what enable() sets them to.
_PATCH: dict[str, Any] = {
    "_CAN_USE_FLASH_ATTN": True,
    "flash_attn_func": flash_attn_interface.flash_attn_func,
    "flash_attn_varlen_func": flash_attn_interface.flash_attn_varlen_func,
    "_wrapped_flash_attn_forward": flash_attn_interface._wrapped_flash_attn_forward,
    "_wrapped_flash_attn_backward": flash_attn_interface._wrapped_flash_attn_backward,
}
_saved: dict[str, Any] | None = None  # the values enable() replaced, while enabled


def _dispatch_module():
    import diffusers
    from diffusers.models import attention_dispatch

    missing = [name for name in _PATCH if not hasattr(attention_dispatch, name)]
    if missing:
        raise RuntimeError(f"diffusers {diffusers.__version__}'s attention_dispatch has no {', '.join(missing)}: "
                           "flash-attn-metal's enable() knows diffusers 0.42's layout")
    return attention_dispatch


def enable() -> None:
    """Make diffusers' `flash` and `flash_varlen` backends run flash-attn-metal (idempotent)."""
    global _saved
    module = _dispatch_module()
    if _saved is None:
        _saved = {name: getattr(module, name) for name in _PATCH}
    for name, value in _PATCH.items():
        setattr(module, name, value)


def disable() -> None:
    """Undo `enable()`: diffusers' flash backends are what they were before."""
    global _saved
    if _saved is None:
        return
    module = _dispatch_module()
    for name, value in _saved.items():
        setattr(module, name, value)
    _saved = None
