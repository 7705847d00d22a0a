"""`compile_shader`'s library object and torch.mps's calling conventions, shared by the CPU and CUDA executors.

A call `lib.name(*args, threads=..., group_size=...)` binds positional argument i to `[[buffer(i)]]`:
a tensor binds its storage at its storage offset (no strides), a Python int a 64-bit `constant long&`,
a float a 32-bit `constant float&`, and a list of ints or floats a `constant long*` or `constant float*`.
`threads` is the grid in threads (1 to 3 dimensions) and `group_size` the threadgroup shape; dispatch is
non-uniform, like `dispatchThreads`. The executors supply `_run`.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .errors import MSLCompileError, Diagnostic
from .msl import Param
from .translate import KernelInfo

MAX_THREADS_PER_THREADGROUP = 1024  # Apple GPUs' limit (and what PyTorch reports for simple kernels)
MAX_THREADGROUP_MEMORY = 32768  # bytes; Apple7/8/9
SIMD_WIDTH = 32

# Torch dtypes a buffer of each MSL element type may bind (vectors bind their element's dtype).
_ELEMENT_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "float": (torch.float32,),
    "half": (torch.float16,),
    "bfloat": (torch.bfloat16,),
    "int": (torch.int32,),
    "uint": (torch.int32, torch.uint32),
    "short": (torch.int16,),
    "ushort": (torch.int16, torch.uint16),
    "char": (torch.int8,),
    "uchar": (torch.uint8, torch.bool),
    "bool": (torch.bool, torch.uint8),
    "long": (torch.int64,),
    "ulong": (torch.int64, torch.uint64),
    "atomic_int": (torch.int32,),
    "atomic_uint": (torch.int32, torch.uint32),
    "atomic_float": (torch.float32,),
}


def _element_dtypes(element_type: str) -> tuple[torch.dtype, ...] | None:
    base = element_type.replace("const", "").strip()
    if base not in _ELEMENT_DTYPES and base[-1:] in ("2", "3", "4"):
        base = base[:-1]
    return _ELEMENT_DTYPES.get(base)


Argument = Union[torch.Tensor, int, float, Sequence[int], Sequence[float]]


@dataclass(frozen=True)
class Bound:
    """One buffer-table entry: a tensor, or host values the executor materialises (int64 or float32)."""

    tensor: torch.Tensor | None = None
    values: tuple | None = None
    is_float: bool = False


class LaunchStruct(ctypes.Structure):
    """Mirrors msl::Launch in include/msl_types.h: the buffer table and the grid."""

    MAX_BUFFERS = 31
    _fields_ = [
        ("buffers", ctypes.c_void_p * MAX_BUFFERS),
        ("buffer_bytes", ctypes.c_uint64 * MAX_BUFFERS),
        ("threads", ctypes.c_uint32 * 3),
        ("group_size", ctypes.c_uint32 * 3),
    ]


def fill_launch(bound: list[Bound], grid: tuple, group: tuple,
                place_values: Callable[[Bound], tuple[int, int, object]]) -> tuple[LaunchStruct, list]:
    """Build the launch struct. `place_values` puts a scalar or list where the device can read it and returns
    (address, bytes, owner); the owners must stay alive until the kernel has run."""
    launch = LaunchStruct()
    owners = []
    for i, b in enumerate(bound):
        if b.tensor is not None:
            t = b.tensor
            launch.buffers[i] = t.data_ptr()
            launch.buffer_bytes[i] = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        else:
            address, size, owner = place_values(b)
            owners.append(owner)
            launch.buffers[i] = address
            launch.buffer_bytes[i] = size
    launch.threads[:] = grid
    launch.group_size[:] = group
    return launch, owners


class KernelFunction:
    """A kernel of a compiled library, called like torch.mps's `MetalKernelFunction`."""

    thread_execution_width = SIMD_WIDTH

    def __init__(self, library: "Library", info: KernelInfo, threadgroup_bytes: int, max_threads: int) -> None:
        self._library = library
        self.info = info
        self.static_thread_group_memory_length = threadgroup_bytes
        # [[max_total_threads_per_threadgroup(N)]] lowers the limit, as it lowers the pipeline's on Metal.
        self.max_threads_per_threadgroup = min(MAX_THREADS_PER_THREADGROUP, max_threads or MAX_THREADS_PER_THREADGROUP)
        self._buffers = sorted((p for p in info.params if p.buffer_index is not None), key=lambda p: p.buffer_index)
        if threadgroup_bytes > MAX_THREADGROUP_MEMORY:
            raise MSLCompileError(
                [Diagnostic(info.line, 1, "error",
                            f"kernel {info.name} uses {threadgroup_bytes} bytes of threadgroup memory; "
                            f"Apple GPUs allow {MAX_THREADGROUP_MEMORY}")],
                f"kernel {info.name} exceeds the threadgroup memory limit",
            )

    def __call__(self, *args: Argument, threads=None, group_size=None) -> None:
        bound = self._bind(args)
        grid, group = self._grid(args, threads, group_size)
        if 0 in grid:
            return
        self._library._run(self, bound, grid, group)

    def _bind(self, args: Sequence[Argument]) -> list[Bound]:
        name = self.info.name
        if len(args) != len(self._buffers):
            raise TypeError(f"kernel {name} takes {len(self._buffers)} buffer arguments "
                            f"({', '.join(p.name for p in self._buffers)}), got {len(args)}")
        bound = []
        for i, (p, a) in enumerate(zip(self._buffers, args)):
            if p.buffer_index != i:
                raise TypeError(f"kernel {name}: buffer indices must be 0..{len(self._buffers) - 1} "
                                f"in order; {p.name} is [[buffer({p.buffer_index})]]")
            bound.append(self._bind_one(p, a))
        return bound

    def _bind_one(self, p: Param, a: Argument) -> Bound:
        where = f"kernel {self.info.name}, argument {p.buffer_index} ({p.name}: {' '.join(p.type_tokens)})"
        if isinstance(a, torch.Tensor):
            if not (p.is_pointer or p.is_reference):
                raise TypeError(f"{where}: a tensor binds a pointer or reference parameter")
            if a.device.type != self._library.device_type:
                raise ValueError(f"{where}: tensor is on {a.device}, this library runs on {self._library.device_type}")
            allowed = _element_dtypes(p.element_type)
            if allowed is not None and a.dtype not in allowed:
                raise TypeError(f"{where}: tensor dtype {a.dtype} does not match element type {p.element_type}")
            return Bound(tensor=a)
        if isinstance(a, bool) or not isinstance(a, (int, float, list, tuple)):
            raise TypeError(f"{where}: unsupported argument type {type(a).__name__}")
        values = tuple(a) if isinstance(a, (list, tuple)) else (a,)
        if not values:
            raise ValueError(f"{where}: an empty list cannot be an argument to a Metal kernel")
        is_float = isinstance(values[0], float)
        expected = "float" if is_float else "long"
        if isinstance(a, (list, tuple)) and not p.is_pointer:
            raise TypeError(f"{where}: a list binds only a `constant {expected}*` parameter")
        if not isinstance(a, (list, tuple)) and not (p.is_reference or p.is_pointer):
            raise TypeError(f"{where}: a scalar binds a `constant {expected}&` parameter")
        base = p.element_type.replace("const", "").strip()
        if base not in ((expected,) if is_float else ("long", "ulong", "int64_t", "uint64_t")):
            raise TypeError(f"{where}: a Python {type(values[0]).__name__} binds as {expected}, "
                            f"but the parameter's type is {base}")
        return Bound(values=tuple(float(v) if is_float else int(v) for v in values), is_float=is_float)

    def _grid(self, args, threads, group_size) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        name = self.info.name
        if threads is None:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is None:
                raise ValueError(f"kernel {name}: number of threads is undefined (no tensor argument)")
            threads = [first.numel()]
        threads = [threads] if isinstance(threads, int) else list(threads)
        if not 1 <= len(threads) <= 3:
            raise ValueError(f"kernel {name}: threads must have 1 to 3 dimensions, got {threads}")
        limit = self.max_threads_per_threadgroup
        if group_size is None:
            group = [min(threads[0], limit)] if len(threads) == 1 else [limit] + [1] * (len(threads) - 1)
        else:
            group = [group_size] if isinstance(group_size, int) else list(group_size)
        if len(group) != len(threads):
            raise ValueError(f"kernel {name}: group_size {group} and threads {threads} differ in dimensions")
        if any(g <= 0 for g in group) or any(t < 0 for t in threads):
            raise ValueError(f"kernel {name}: group_size {group} and threads {threads} must be positive")
        if math.prod(group) > limit:
            why = "its [[max_total_threads_per_threadgroup]]" if limit < MAX_THREADS_PER_THREADGROUP else "Apple GPUs'"
            raise ValueError(f"kernel {name}: threadgroup size {math.prod(group)} exceeds {limit} limit ({why})")
        pad = [1] * (3 - len(threads))
        return tuple(threads + pad), tuple(group + pad)  # type: ignore[return-value]


class Library:
    """The compiled kernels of one MSL source, one attribute per `kernel` function."""

    device_type: str

    def __init__(self, kernels: dict[str, KernelInfo]) -> None:
        self._infos = kernels
        self._functions: dict[str, KernelFunction] = {}

    def __getattr__(self, name: str) -> KernelFunction:
        if name.startswith("_"):
            raise AttributeError(name)
        function = self._functions.get(name)
        if function is None:
            if name not in self._infos:
                raise AttributeError(f"no kernel named {name!r} (kernels: {', '.join(self._infos)})")
            function = KernelFunction(self, self._infos[name], *self._limits(name))
            self._functions[name] = function
        return function

    def __dir__(self) -> list[str]:
        return sorted(self._infos)

    def _limits(self, name: str) -> tuple[int, int]:
        """The kernel's threadgroup memory in bytes and its [[max_total_threads_per_threadgroup]] (0: none)."""
        raise NotImplementedError

    def _run(self, kernel: KernelFunction, bound: list[Bound], grid: tuple, group: tuple) -> None:
        raise NotImplementedError
