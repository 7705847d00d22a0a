"""Decoding speed: the vector (decode) kernels against torch's scaled_dot_product_attention on MPS.

On a Mac (MPS available): one decode step (one new token of each sequence) through one layer of a
Llama-3-8B-shaped kv cache (32 query heads, 8 K/V heads) of 1k ... 32k rows, d = 64/128/256, fp16, batch 1 and
4, via flash_attn_with_kvcache (causal, no append) and via SDPA on the same cache (enable_gqa where this torch
has it, else K/V repeated per query head beforehand, as transformers' repeat_kv does). Prints ms per layer step,
attention-only tokens per second for the model's 32 layers, the GB/s the step moves (decode_report's bytes) and
its share of the chip's bandwidth, and the speed-up over SDPA. Elsewhere: prints the decode kernels' static
figures (bytes per token against the I/O bound, bandwidth-limited time per chip) and says that timings need a Mac.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from flash_attn_metal.bench import _time
from flash_attn_metal.kernels import decode_report
from flash_attn_metal.runtime.device import detect, gpu_cores

CACHE_ROWS = (1024, 4096, 16384, 32768)
HEAD_DIMS = (64, 128, 256)
BATCHES = (1, 4)
MODEL = decode_report.LLAMA_3_8B
REPEATS = 20  # timed runs per step, after a warm-up one


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """SDPA over (batch, heads, rows, d) tensors: GQA natively where torch has enable_gqa, else repeated K/V."""
    if "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "enable_gqa"
    group = q.shape[1] // k.shape[1]
    kr, vr = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return lambda: F.scaled_dot_product_attention(q, kr, vr), "repeated K/V"


def main() -> None:
    if not torch.backends.mps.is_available():
        print(decode_report.format_report())
        print("\nApple GPU timings need a Mac with MPS: run this script there. No timing is reported here.")
        return
    from flash_attn_metal import flash_attn_with_kvcache

    info = detect()
    bandwidth = info.bandwidth_gbs if info else None
    print(f"{info.name if info else 'MPS'}: bandwidth {bandwidth or '?'} GB/s; {MODEL.name}-shaped layer "
          f"({MODEL.nheads}/{MODEL.nheads_k} heads), fp16, one new token per sequence; tokens/s count "
          f"{MODEL.layers} layers of attention only")
    print(f"{'batch':>5} {'d':>4} {'rows':>6} {'ours ms':>8} {'tok/s':>8} {'GB/s':>7} {'% bw':>6} {'SDPA ms':>8} "
          f"{'tok/s':>8} {'speed-up':>8}  SDPA path")
    h, hk = MODEL.nheads, MODEL.nheads_k
    for batch in BATCHES:
        for d in HEAD_DIMS:
            spec = decode_report.report_spec("half", d)
            for rows in CACHE_ROWS:
                q = torch.randn(batch, 1, h, d, device="mps", dtype=torch.float16)
                k_cache, v_cache = (torch.randn(batch, rows, hk, d, device="mps", dtype=torch.float16)
                                    for _ in range(2))
                seqlens = torch.full((batch,), rows, dtype=torch.int32, device="mps")
                ours = _time(lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True),
                             "mps", REPEATS)
                step, path = _sdpa(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
                sdpa = _time(step, "mps", REPEATS)
                moved, _, _ = decode_report.token_traffic(spec, rows, d, gpu_cores(), MODEL)
                gbs = batch * moved / MODEL.layers / ours / 1e9
                share = f"{100 * gbs / bandwidth:5.1f}%" if bandwidth else "    ?"
                per_token = lambda seconds: batch / (MODEL.layers * seconds)  # noqa: E731
                print(f"{batch:>5} {d:>4} {rows:>6} {ours * 1e3:>8.3f} {per_token(ours):>8.1f} {gbs:>7.1f} {share:>6} "
                      f"{sdpa * 1e3:>8.3f} {per_token(sdpa):>8.1f} {sdpa / ours:>7.2f}x  {path}")


if __name__ == "__main__":
    main()
