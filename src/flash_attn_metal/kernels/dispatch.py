"""What routing calls to run an `AttentionProblem` on the Metal kernels.

    unsupported_reason(problem, needs_grad) -> str | None   # None: the kernels run it
    forward(problem, backend_name) -> (out, lse)            # backend_name: "mps" or "emulator"
"""

from __future__ import annotations

import math

import torch

from ..problem import AttentionProblem
from ..runtime.backend import get_backend
from ..runtime.device import gpu_family
from .forward import FLOAT_ARGS, INT_ARGS, forward_source
from .spec import MSL_TYPES, ForwardSpec

LOG2E = math.log2(math.e)


def native_features() -> str:
    return ("forward in fp16/bf16/fp32, head dims up to 256, causal and local masks, softcap, ALiBi, "
            "GQA/MQA, varlen, strided inputs; backward and dropout run the PyTorch reference")


def unsupported_reason(problem: AttentionProblem, needs_grad: bool) -> str | None:
    if problem.q.device.type == "mps" and gpu_family() is None:
        return "the Metal device is not Apple silicon (the kernels need simdgroup_matrix: Apple7/M1 or newer)"
    if needs_grad:
        return "the backward kernels are not built yet (calls that need gradients run the reference)"
    if problem.dropout_p > 0:
        return "dropout runs on the PyTorch reference"
    return None


def _spec(p: AttentionProblem) -> ForwardSpec:
    masked = p.window_left >= 0 or p.window_right >= 0
    return ForwardSpec.for_call(MSL_TYPES[str(p.q.dtype).removeprefix("torch.")], p.head_dim, gpu_family(),
                                varlen=p.is_varlen, masked=masked, softcap=p.softcap > 0,
                                alibi=p.alibi_slopes is not None)


def _strides(x: torch.Tensor, varlen: bool) -> list[int]:
    """(batch, row, head) element strides; varlen tensors have no batch dimension."""
    return [0, x.stride(0), x.stride(1)] if varlen else [x.stride(0), x.stride(1), x.stride(2)]


def forward(p: AttentionProblem, backend_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(p)
    q, k, v = p.q, p.k, p.v
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if p.is_varlen:
        lse = torch.empty((p.nheads, q.shape[0]), dtype=torch.float32, device=q.device)
        lse_strides = [0, lse.stride(0)]
    else:
        lse = torch.empty((p.batch, p.nheads, q.shape[1]), dtype=torch.float32, device=q.device)
        lse_strides = [lse.stride(0), lse.stride(1)]
    alibi = p.alibi_slopes.contiguous() if p.alibi_slopes is not None else None
    ints = dict(zip(INT_ARGS, [
        0 if p.is_varlen else q.shape[1], 0 if p.is_varlen else k.shape[1], p.head_dim, p.nheads // p.nheads_k,
        *_strides(q, p.is_varlen), *_strides(k, p.is_varlen), *_strides(v, p.is_varlen), *_strides(out, p.is_varlen),
        *lse_strides, p.window_left, p.window_right,
        (alibi.shape[-1] if alibi is not None and alibi.dim() == 2 else 0),
    ]))
    score_scale = p.softmax_scale / p.softcap if p.softcap > 0 else p.softmax_scale * LOG2E
    floats = dict(zip(FLOAT_ARGS, [score_scale, p.softcap * LOG2E]))
    args = [q, k, v, out, lse, [ints[n] for n in INT_ARGS], [floats[n] for n in FLOAT_ARGS]]
    if p.is_varlen:
        args += [p.cu_seqlens_q, p.cu_seqlens_k]
    if alibi is not None:
        args.append(alibi)
    backend = "mps" if backend_name == "mps" else ("cuda-emulator" if q.is_cuda else "emulator")
    kernel = getattr(get_backend(backend).compile(forward_source(spec)), spec.name)
    threads = spec.tiles.threads
    query_blocks = -(-p.max_seqlen_q // spec.block_q)
    kernel(*args, threads=[query_blocks * threads, p.nheads, p.batch], group_size=[threads, 1, 1])
    return out, lse
