"""The exception a bad argument raises.

flash-attn checks its arguments in C++ (`TORCH_CHECK` in csrc/flash_attn/flash_api.cpp), which raises
`RuntimeError`; this package has always raised `ValueError`. `ArgumentError` is both, so code written against
either keeps working. A value of the wrong Python type (a list where a tensor belongs, a string for a number)
still raises `TypeError`.
"""

from __future__ import annotations


class ArgumentError(ValueError, RuntimeError):
    """An argument has a value, shape, dtype or device the call cannot take; the message names it and says
    what was expected."""
