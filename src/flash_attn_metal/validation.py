"""Input checks for the public functions: bad input raises before any kernel runs, with a message naming the
argument and what was expected. A value of the wrong Python type raises TypeError; a wrong value, shape,
dtype or device raises `ArgumentError` (a ValueError and a RuntimeError, as flash-attn's checks raise).

Checks that read tensor values on the host (cu_seqlens) are separate from the rest: under torch.compile they
cannot run while tracing, so the custom op runs them when it executes (see `ops`).
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .errors import ArgumentError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
INT32_MAX = 2**31 - 1  # flash-attn takes sequence lengths as C ints: no real call has a longer sequence
INT64_MAX = 2**63 - 1  # kernels take every integer argument as a 64-bit `long`
UNREAD = -1  # a max_seqlen that tracing could not read from the tensors: the custom op finds it (ops)


def tensor(name: str, x: object, rank: int | Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if x.dim() not in ranks:
        expected = " or ".join(str(r) for r in ranks)
        raise ArgumentError(f"{name} must have {expected} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(-1) != 1 and x.numel():
        raise ArgumentError(f"{name} must have a contiguous last dimension (stride(-1) == 1), got strides {x.stride()}")
    return x


def same_kind(named: dict[str, torch.Tensor]) -> None:
    (first_name, first), *rest = named.items()
    for name, x in rest:
        if x.dtype != first.dtype:
            raise ArgumentError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}; they must match")
        if x.device != first.device:
            raise ArgumentError(f"{name} is on {x.device} but {first_name} is on {first.device}; they must match")


def heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ArgumentError(f"q's head dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ArgumentError(f"q, k and v must share the head dim; got {d}, {k.shape[-1]} and {v.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ArgumentError(f"k and v must have the same number of heads; got {k.shape[-2]} and {v.shape[-2]}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk != 0:
        raise ArgumentError(f"the number of query heads ({h}) must be a multiple of the number of key/value heads "
                            f"({hk})")


def number(name: str, value: object) -> float:
    """A real number given as a Python number or a 0-d tensor."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {value!r}")


def window(window_size: object) -> tuple[int, int]:
    """(left, right) from a pair of ints or a 2-element integer tensor; -1 means unbounded."""
    if isinstance(window_size, torch.Tensor):
        if window_size.dtype.is_floating_point or window_size.dtype.is_complex:
            raise TypeError(f"window_size must hold integers, got a {window_size.dtype} tensor")
        window_size = window_size.tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    if not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size):
        raise TypeError(f"window_size must hold integers, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if not (-1 <= left <= INT64_MAX and -1 <= right <= INT64_MAX):
        raise ArgumentError(f"window_size entries must be between -1 (-1: unbounded) and 2**63 - 1, got "
                            f"{(left, right)}")
    return left, right


def local_window(left: int, right: int, causal: bool, seqlen_k: int) -> tuple[int, int]:
    """The window a call runs with, as flash-attn normalises it: a side at least `seqlen_k` long (the key length,
    varlen's max_seqlen_k or the kv cache's capacity) is unbounded, and causal sets the right side to 0."""
    left = -1 if left >= seqlen_k else left
    right = -1 if right >= seqlen_k else right
    return left, 0 if causal else right


def dropout(dropout_p: object, softcap: float) -> float:
    p = number("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if p > 0 and softcap > 0:
        raise ArgumentError("softcap does not support dropout: pass softcap=0.0 or dropout_p=0.0")
    return p


def alibi(alibi_slopes: object, batch: int, nheads: int, device: torch.device) -> torch.Tensor | None:
    """ALiBi slopes: an fp32 (nheads,) or (batch, nheads) tensor on q's device, or None."""
    return _fp32("alibi_slopes", alibi_slopes, ((nheads,), (batch, nheads)), f"({nheads},) or ({batch}, {nheads})",
                 device)


def sinks(value: object, nheads: int, device: torch.device) -> torch.Tensor | None:
    """Per-head sink logits: an fp32 (nheads,) tensor on q's device, or None."""
    return _fp32("sinks", value, ((nheads,),), f"({nheads},) (one logit per query head)", device)


def _fp32(name: str, value: object, shapes: tuple[tuple[int, ...], ...], expected: str,
          device: torch.device) -> torch.Tensor | None:
    """An optional fp32 tensor of one of `shapes` (`expected` spells them) on q's device."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.float32:
        raise ArgumentError(f"{name} must be float32, got {value.dtype}")
    if tuple(value.shape) not in shapes:
        raise ArgumentError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if value.device != device:
        raise ArgumentError(f"{name} is on {value.device} but q is on {device}")
    return value


def cu_seqlens(name: str, cu: object, device: torch.device) -> torch.Tensor:
    """A cu_seqlens tensor's type, dtype, shape and device (what tracing can check; `offsets` reads the values)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ArgumentError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ArgumentError(f"{name} must be 1-D with batch_size + 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ArgumentError(f"{name} is on {cu.device} but q is on {device}")
    return cu


def offsets(name: str, cu: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens's values (one host read), checked: from 0, non-decreasing, within the `total` rows."""
    values = cu.tolist()
    if values[0] != 0:
        raise ArgumentError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ArgumentError(f"{name} must be non-decreasing, got {values}")
    if values[-1] > total:
        raise ArgumentError(f"{name} ends at {values[-1]} but the tensor holds only {total} tokens")
    return values


def max_seqlen(name: str, value: object) -> int:
    """The caller's bound on the sequence lengths: an int (or 0-d integer tensor) that fits flash-attn's C int."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:  # transformers may pass a 0-d tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {value!r}")
    value = int(value)
    if not 0 <= value <= INT32_MAX:
        raise ArgumentError(f"{name} must be between 0 and 2**31 - 1 (flash-attn's int), got {value}")
    return value


def longest(name: str, bound: int, offsets: list[int]) -> int:
    """The longest sequence of `offsets`, checked against the caller's `bound` on it (max_seqlen_q or _k). Kernels
    size their grids by this, never by the bound, so a loose bound costs nothing."""
    found = max((b - a for a, b in zip(offsets, offsets[1:])), default=0)
    if bound < found:
        raise ArgumentError(f"{name} is {bound} but the longest sequence has {found} tokens")
    return found


def num_splits(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0 (0: chosen by the kernels), got {value!r}")
    if value < 0:
        raise ArgumentError(f"num_splits must be an int >= 0 (0: chosen by the kernels), got {value!r}")
    return int(value)


def softmax_scale(scale: object, head_dim: int) -> float:
    """The caller's scale, or 1/sqrt(d) of the head dim as given (before any padding)."""
    return head_dim**-0.5 if scale is None else number("softmax_scale", scale)
