"""Large-N runs of the generated MSL kernels on an NVIDIA GPU through the CUDA emulator.

    python benchmarks/large_cuda.py [forward] [backward] [decode]     (default: all three)
        forward:  N = 8192 and 32768, d = 128 and 256, causal and not, and N = 131072 at d = 128; fp16, B=1, H=2
        backward: N = 8192, d = 64, 128 and 256, causal and not, fp16, B=1, GQA 4:1 (H=4, H_kv=1)
        decode:   flash_attn_with_kvcache, one new token over 32768 and 131072 cache rows, dense and paged
                  (256-row pages), fp16, B=2, H=32, H_kv=8, d = 128, causal: the vector (decode) kernels with
                  split-KV and their combine kernel (a run that takes another path fails)

Each run goes through the public functions with FLASH_ATTN_METAL_BACKEND=emulator and STRICT=1 on CUDA tensors
and is checked against the fp32 reference with the upstream tolerance rule (2x for the output, 3x for
gradients), computed on the GPU too. Prints one line per run and exits non-zero if any fails. These are emulator
timings, not Apple GPU timings.
"""

from __future__ import annotations

import os
import sys
import time

import torch

os.environ["FLASH_ATTN_METAL_BACKEND"] = "emulator"
os.environ["FLASH_ATTN_METAL_STRICT"] = "1"

from flash_attn_metal import flash_attn_func, flash_attn_with_kvcache, stats  # noqa: E402
from flash_attn_metal.problem import AttentionProblem, KVCache  # noqa: E402
from flash_attn_metal.reference import attention  # noqa: E402

FORWARD = [(n, d, causal) for n in (8192, 32768) for d in (128, 256) for causal in (False, True)] + [(131072, 128, False)]
BACKWARD = [(8192, d, causal) for d in (64, 128, 256) for causal in (False, True)]
DECODE = [(rows, paged) for rows in (32768, 131072) for paged in (False, True)]


def reference(q, k, v, causal, grad, upcast):
    leaves = [t.detach().clone().requires_grad_(grad is not None) for t in (q, k, v)]
    problem = AttentionProblem(q=leaves[0], k=leaves[1], v=leaves[2], softmax_scale=q.shape[-1] ** -0.5,
                               causal=causal, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                               alibi_slopes=None, dropout_p=0.0)
    out, lse = attention(problem, upcast=upcast)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype)) if grad is not None else ()
    return out.detach(), lse, grads


def within_rule(name: str, ours, exact, low, factor: int) -> tuple[bool, str]:
    """The upstream rule: our error against fp32 at most `factor` x low-precision PyTorch's (2 for outputs, 3 for
    gradients), plus a small slack."""
    err = (ours.float() - exact.float()).abs().max().item()
    bound = factor * (low.float() - exact.float()).abs().max().item() + (1e-5 if factor == 2 else 1e-4)
    return err <= bound, f"{name} {err:.1e}/{bound:.1e}"


def decode(rows: int, paged: bool) -> bool:
    """One decoding step of two sequences (rows - 1 and rows // 3 cached tokens) appending one token each."""
    torch.manual_seed(0)
    b, h, hk, d, page = 2, 32, 8, 128, 256
    cuda = dict(device="cuda", dtype=torch.float16)
    q = torch.randn(b, 1, h, d, **cuda)
    k_new, v_new = (torch.randn(b, 1, hk, d, **cuda) for _ in range(2))
    seqlens = torch.tensor([rows - 1, rows // 3], dtype=torch.int32, device="cuda")
    if paged:
        blocks = rows // page
        table = torch.randperm(b * blocks, device="cuda").reshape(b, blocks).int()
        k_cache, v_cache = (torch.randn(b * blocks, page, hk, d, **cuda) for _ in range(2))
    else:
        table = None
        k_cache, v_cache = (torch.randn(b, rows, hk, d, **cuda) for _ in range(2))
    torch.cuda.synchronize()
    launched_before = stats()["launches"]
    start = time.perf_counter()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                       causal=True, return_softmax_lse=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    kernels = sorted(n for n, count in stats()["launches"].items() if count > launched_before.get(n, 0))
    slots = torch.arange(b, dtype=torch.int32, device="cuda")
    layout = KVCache(seqlens + 1, None if paged else torch.zeros_like(slots), None if paged else slots, table)
    problem = AttentionProblem(q=q, k=k_cache, v=v_cache, softmax_scale=d**-0.5, causal=True, window_left=-1,
                               window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0, max_seqlen_q=1,
                               max_seqlen_k=rows, kv_cache=layout)
    ref_out, ref_lse = attention(problem, upcast=True)
    low_out, _ = attention(problem, upcast=False)
    ok, line = within_rule("out", out, ref_out, low_out, 2)
    ok &= (lse - ref_lse).abs().max().item() <= 1e-3
    ok &= bool(kernels) and all(name.startswith("attention_decode") for name in kernels)  # the vector path ran
    print(f"decode  rows={rows:6d} {'paged' if paged else 'dense'} d={d} H={h}/{hk}: {seconds:7.2f} s  error/bound "
          f"{line}  {'PASS' if ok else 'FAIL'}  {' + '.join(kernels)}", flush=True)
    return ok


def run(n: int, d: int, causal: bool, heads: int, kv_heads: int, backward: bool) -> bool:
    torch.manual_seed(0)
    q = torch.randn(1, n, heads, d, device="cuda", dtype=torch.float16, requires_grad=backward)
    k, v = (torch.randn(1, n, kv_heads, d, device="cuda", dtype=torch.float16, requires_grad=backward) for _ in range(2))
    grad = torch.randn_like(q) if backward else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    ours = torch.autograd.grad(out, (q, k, v), grad) if backward else ()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref_out, ref_lse, ref_grads = reference(q, k, v, causal, grad, True)
    low_out, _, low_grads = reference(q, k, v, causal, grad, False)
    checks = [("out", out, ref_out, low_out, 2)] + [
        (name, g, r, lp, 3) for name, g, r, lp in zip(("dq", "dk", "dv"), ours, ref_grads, low_grads)]
    ok = (lse - ref_lse).abs().max().item() <= 1e-3
    parts = []
    for check in checks:
        passed, part = within_rule(*check)
        ok &= passed
        parts.append(part)
    kind = "fwd+bwd" if backward else "fwd"
    print(f"{kind:7} N={n:6d} d={d} H={heads}/{kv_heads} causal={causal!s:5}: {seconds:7.2f} s  "
          f"error/bound {'  '.join(parts)}  {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("needs an NVIDIA GPU with CuPy")
        return 2
    sections = set(sys.argv[1:]) or {"forward", "backward", "decode"}
    results = [run(n, d, causal, 2, 2, False) for n, d, causal in FORWARD if "forward" in sections]
    results += [run(n, d, causal, 4, 1, True) for n, d, causal in BACKWARD if "backward" in sections]
    results += [decode(rows, paged) for rows, paged in DECODE if "decode" in sections]
    print("kernels launched:", stats()["launches"])
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
