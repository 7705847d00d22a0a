"""Run MSL on an NVIDIA GPU: the CUDA translation (include/msl_cuda.h) is compiled with NVRTC through CuPy
and launched on PyTorch's current CUDA stream. Imported only for `compile_shader(source, "cuda")`."""

from __future__ import annotations

import ctypes
import warnings

import torch

from ..runtime.cache import MemoryCache, cache_key
from ..stats import record_compile
from .cpu import INCLUDE_DIR, _headers_digest
from .errors import Diagnostic, KernelExecutionError, MSLCompileError
from .library import Bound, KernelFunction, Library, fill_launch
from .translate import Translation

try:
    import cupy
except ImportError as exc:  # only on machines without CuPy
    raise ImportError("the CUDA emulator needs CuPy (pip install cupy-cuda12x or cupy-cuda13x)") from exc

# Functions without __device__ (the kernels' own helpers) compile for the device.
NVRTC_OPTIONS = ("-std=c++17", "--device-as-default-execution-space", f"-I{INCLUDE_DIR}", "-w")
ERROR_BYTES = 32  # sizeof(MslError) in include/msl_cuda.h
# By code; an access's error names its buffer, or threadgroup memory (buffer -1). The CPU executor words them alike.
_ERRORS = {
    1: "{where}: element {element} is out of bounds (a {size}-byte access at byte {offset}; {holds} {extent} bytes)",
    2: "a simdgroup_matrix operation needs all 32 lanes of the SIMD group",
    3: "simdgroup_load/store with transpose_matrix and a nonzero matrix_origin: Apple does not document how they "
       "combine; offset the pointer instead",
    4: "{where}: a misaligned {size}-byte access at byte {offset} (Metal needs {extent}-byte alignment)",
}
_modules: MemoryCache = MemoryCache()


def _module(translation: Translation, debug: bool, fast_math: bool) -> "cupy.RawModule":
    options = NVRTC_OPTIONS + (("-DMSL_DEBUG",) if debug else ()) + (("--use_fast_math",) if fast_math else ())
    key = cache_key(source=translation.cpp, headers=_headers_digest(), options=options)

    def build() -> "cupy.RawModule":
        module = cupy.RawModule(code=translation.cpp, options=options)
        try:
            module.compile()
        except cupy.cuda.compiler.CompileException as exc:
            raise MSLCompileError([Diagnostic(0, 0, "error", str(exc)[-3000:])],
                                  "NVRTC could not compile the CUDA translation") from exc
        record_compile()
        return module

    return _modules.get_or_create(key, build)


def _device_values(b: Bound, device: torch.device) -> tuple[int, int, object]:
    values = torch.tensor(b.values, dtype=torch.float32 if b.is_float else torch.int64, device=device)
    return values.data_ptr(), values.numel() * values.element_size(), values


class CudaLibrary(Library):
    device_type = "cuda"

    def __init__(self, translation: Translation, debug: bool, fast_math: bool = False) -> None:
        super().__init__(translation.kernels)
        self._module = _module(translation, debug, fast_math)

    def _limits(self, name: str) -> tuple[int, int]:
        out = cupy.zeros(2, dtype=cupy.uint64)
        self._module.get_function(f"msl_limits_{name}")((1,), (1,), (out,))
        threadgroup_bytes, max_threads = out.get().tolist()
        return int(threadgroup_bytes), int(max_threads)

    def _run(self, kernel: KernelFunction, bound: list[Bound], grid: tuple, group: tuple) -> None:
        device = torch.device("cuda", torch.cuda.current_device())
        launch, owners = fill_launch(bound, grid, group, lambda b: _device_values(b, device))
        launch_bytes = torch.frombuffer(bytearray(ctypes.string_at(ctypes.addressof(launch), ctypes.sizeof(launch))),
                                        dtype=torch.uint8).to(device)
        with warnings.catch_warnings():  # newer CuPy prefers Stream.from_external; older has only this
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        error = cupy.ndarray((ERROR_BYTES,), cupy.uint8, self._module.get_global("msl_error"))
        error.data.memset_async(0, ERROR_BYTES, stream)
        blocks = tuple(-(-t // g) for t, g in zip(grid, group))
        function = self._module.get_function(f"msl_kernel_{kernel.info.name}")
        function(blocks, (group[0] * group[1] * group[2],), (cupy.uint64(launch_bytes.data_ptr()),),
                 shared_mem=kernel.static_thread_group_memory_length, stream=stream)
        raw = error.get(stream=stream).tobytes()  # synchronises: the emulator checks every launch
        code, buffer = (int.from_bytes(raw[i : i + 4], "little", signed=True) for i in (0, 4))
        offset, size, extent = (int.from_bytes(raw[i : i + 8], "little", signed=True) for i in (8, 16, 24))
        if code:
            if buffer == -2:
                where, holds = "a pointer made from an address", ""
            elif buffer < 0:
                where, holds = "threadgroup memory", "the kernel has"
            else:
                name = kernel.info.buffer_names.get(buffer, "?")
                where, holds = f"buffer {buffer} ({name})", "the bound tensor holds"
            detail = _ERRORS[code].format(where=where, holds=holds, element=offset // max(size, 1), size=size,
                                          offset=offset, extent=extent)
            raise KernelExecutionError(f"kernel {kernel.info.name}: {detail}")
        del owners
