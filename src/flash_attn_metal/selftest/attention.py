"""The attention grid: every public function on the device's kernels against the CPU reference.

    comparisons = check(case, device)    # [verify.Comparison]; raises when the call fails

Each case calls one public function (flash_attn_func, the packed and varlen forms, flash_attn_with_kvcache with
dense and paged caches) on one dtype, head dim and mask, with ragged lengths (113 queries, 250 keys, GQA 4:2),
and checks out and lse (and dq, dk, dv with `backward`) by the upstream rule (verify.py). A call the kernels did
not run (a fallback to the reference) is a failure, not a pass.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

import flash_attn_metal
from ..bench import DTYPES
from ..problem import AttentionProblem, KVCache
from ..stats import reset_stats, stats
from ..verify import Comparison, compare_results, references

FUNCTIONS = ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
             "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache")
MASKS = {  # flash-attn keyword arguments of each mask
    "none": {}, "causal": {"causal": True}, "local": {"window_size": (48, 16)}, "softcap": {"softcap": 5.0},
    "alibi": {},  # slopes are made per case
}
BATCH, SEQLEN_Q, SEQLEN_K, HEADS, HEADS_K = 2, 113, 250, 4, 2
VARLEN_Q, VARLEN_K = (37, 113), (70, 250)  # per sequence
HEAD_DIMS = (32, 40, 59, 80, 96, 128, 160, 192, 256)  # common models' head dims, and one not a multiple of 8
CACHE_ROWS, CACHE_SEQLENS, NEW_TOKENS, PAGE = 320, (250, 37), 3, 32  # kv cache: rows before the append


@dataclass(frozen=True)
class AttentionCase:
    function: str  # one of FUNCTIONS
    dtype: str  # one of DTYPES
    head_dim: int
    mask: str = "none"  # one of MASKS
    backward: bool = False  # also dq, dk, dv (not for flash_attn_with_kvcache)
    cache: str = ""  # flash_attn_with_kvcache only: "dense" or "paged"

    @property
    def name(self) -> str:
        parts = [self.function, self.cache, self.dtype, f"d{self.head_dim}", self.mask if self.mask != "none" else "",
                 "backward" if self.backward else ""]
        return " ".join(p for p in parts if p)


def grid(quick: bool) -> list[AttentionCase]:
    """The quick grid (one case per function, each dtype and a few head dims and masks), or the full one: every
    function in every dtype, every representative head dim, every mask, forward and backward."""
    A = AttentionCase  # noqa: N806
    func, kvpacked, qkvpacked, varlen, varlen_kvpacked, varlen_qkvpacked, kvcache = FUNCTIONS
    if quick:
        return [A(func, "fp16", 64, "causal", True), A(func, "bf16", 128, backward=True), A(func, "fp32", 96),
                A(kvpacked, "bf16", 64, "local"), A(qkvpacked, "fp16", 64, "softcap"),
                A(varlen, "fp16", 64, "causal", True), A(varlen_kvpacked, "fp32", 32, "alibi"),
                A(varlen_qkvpacked, "bf16", 64), A(kvcache, "fp16", 128, "causal", cache="dense"),
                A(kvcache, "bf16", 64, "causal", cache="paged")]
    cases = []
    for dtype in DTYPES:
        cases += [A(function, dtype, 64, "causal", True) for function in FUNCTIONS[:-1]]
        cases += [A(kvcache, dtype, 64, "causal", cache=c) for c in ("dense", "paged")]
        for d in HEAD_DIMS:
            cases += [A(func, dtype, d, mask, True) for mask in ("none", "causal")]
        cases += [A(func, dtype, 128, mask, True) for mask in ("local", "softcap", "alibi")]
        cases += [A(kvcache, dtype, 128, mask, cache=c) for mask in ("local", "softcap", "alibi")
                  for c in ("dense", "paged")]
    return cases


def check(case: AttentionCase, device: str) -> list[Comparison]:
    """Run the case on `device` and compare it with the reference; raises when the call itself fails."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    dtype = DTYPES[case.dtype]

    def randn(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    options = dict(MASKS[case.mask])
    if case.mask == "alibi":
        options["alibi_slopes"] = (torch.rand(HEADS, generator=g) * 0.3).to(device)
    if case.function == "flash_attn_with_kvcache":
        return _kvcache(case, device, randn, options)
    varlen = "varlen" in case.function
    d, grad = case.head_dim, case.backward
    if varlen:
        lens_q, lens_k = (VARLEN_Q, VARLEN_Q) if case.function.endswith("qkvpacked_func") else (VARLEN_Q, VARLEN_K)
        q = randn(sum(lens_q), HEADS, d, grad=grad)
        kv_rows = sum(lens_k)
    else:
        lens_q = lens_k = ()
        seqlen_k = SEQLEN_Q if case.function.endswith("qkvpacked_func") else SEQLEN_K
        q = randn(BATCH, SEQLEN_Q, HEADS, d, grad=grad)
    heads_k = HEADS if case.function.endswith("qkvpacked_func") else HEADS_K
    kv_shape = (kv_rows, heads_k, d) if varlen else (BATCH, seqlen_k, heads_k, d)
    k, v = randn(*kv_shape, grad=grad), randn(*kv_shape, grad=grad)

    reset_stats()
    out, lse = _call(case.function, q, k, v, lens_q, lens_k, options)
    _require_kernels()
    cu_q, cu_k = (_cu_seqlens(lens, device) for lens in (lens_q, lens_k)) if varlen else (None, None)
    problem = AttentionProblem(
        q=q, k=k, v=v, **_mask_fields(options, d), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max(lens_k, default=0))
    dout = randn(*out.shape) if grad else None
    exact, low = references(problem, dout)
    grads = torch.autograd.grad(out, (q, k, v), dout) if grad else ()
    return compare_results(exact, low, out=out, lse=lse, grads=grads)


def _require_kernels() -> None:
    """Raise when the call since the last reset_stats() launched no kernel (it fell back to the reference)."""
    if not stats()["launches"]:
        raise RuntimeError("the kernels did not run: the call fell back to the PyTorch reference")


def _mask_fields(options: dict, head_dim: int) -> dict:
    """AttentionProblem's scale, mask, softcap, ALiBi and dropout fields for a case's flash-attn keyword arguments."""
    causal = bool(options.get("causal"))
    left, right = options.get("window_size", (-1, -1))
    return dict(softmax_scale=head_dim**-0.5, causal=causal, window_left=left, window_right=0 if causal else right,
                softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi_slopes"), dropout_p=0.0)


def _cu_seqlens(lens: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _call(function: str, q, k, v, lens_q, lens_k, options) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the public function, the packed forms packed from q, k, v (so gradients reach them)."""
    fn = getattr(flash_attn_metal, function)
    if "varlen" in function:
        cu_q, cu_k = _cu_seqlens(lens_q, q.device), _cu_seqlens(lens_k, q.device)
        if function == "flash_attn_varlen_qkvpacked_func":
            args = (torch.stack((q, k, v), 1), cu_q, max(lens_q))
        else:
            kv = (k, v) if function == "flash_attn_varlen_func" else (torch.stack((k, v), 1),)
            args = (q, *kv, cu_q, cu_k, max(lens_q), max(lens_k))
    elif function == "flash_attn_func":
        args = (q, k, v)
    elif function == "flash_attn_kvpacked_func":
        args = (q, torch.stack((k, v), 2))
    else:
        args = (torch.stack((q, k, v), 2),)
    out, lse, _ = fn(*args, **options, return_attn_probs=True)
    return out, lse


def _kvcache(case: AttentionCase, device: str, randn, options: dict) -> list[Comparison]:
    """One append-and-attend step of NEW_TOKENS per sequence, the cache dense or paged (pages in shuffled order)."""
    d, b = case.head_dim, len(CACHE_SEQLENS)
    q = randn(b, NEW_TOKENS, HEADS, d)
    k_new, v_new = randn(b, NEW_TOKENS, HEADS_K, d), randn(b, NEW_TOKENS, HEADS_K, d)
    seqlens = torch.tensor(CACHE_SEQLENS, dtype=torch.int32, device=device)
    if case.cache == "paged":
        pages = -(-CACHE_ROWS // PAGE)
        order = torch.randperm(b * pages, generator=torch.Generator().manual_seed(0))
        table = order.view(b, pages).to(device, torch.int32)
        k_cache, v_cache = randn(b * pages, PAGE, HEADS_K, d), randn(b * pages, PAGE, HEADS_K, d)
        layout = dict(block_table=table)
        cache = KVCache(seqlens + NEW_TOKENS, None, None, table)
    else:
        k_cache, v_cache = randn(b, CACHE_ROWS, HEADS_K, d), randn(b, CACHE_ROWS, HEADS_K, d)
        layout = {}
        zeros = torch.zeros(b, dtype=torch.int32, device=device)
        cache = KVCache(seqlens + NEW_TOKENS, zeros, torch.arange(b, dtype=torch.int32, device=device), None)
    reset_stats()
    out, lse = flash_attn_metal.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                        **layout, **options, return_softmax_lse=True)
    _require_kernels()
    problem = AttentionProblem(  # the caches after the append, as the kernels read them
        q=q, k=k_cache, v=v_cache, **_mask_fields(options, d), max_seqlen_q=NEW_TOKENS,
        max_seqlen_k=max(CACHE_SEQLENS) + NEW_TOKENS, kv_cache=cache)
    return compare_results(*references(problem), out=out, lse=lse)
