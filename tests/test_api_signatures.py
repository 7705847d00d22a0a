"""The public functions keep flash-attn 2.8's signatures exactly: names, order, defaults (transformers
inspects them, and upstream tests pass dropout_p positionally), with one extension only at the end: keyword-only
`sinks=None`. The SDPA drop-in keeps torch's calling convention."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import bert_padding, flash_attn_interface
from flash_attn_metal.layers import rotary

# Written down from flash-attn 2.8's flash_attn/flash_attn_interface.py.
FLASH_ATTN_2_8 = {
    "flash_attn_qkvpacked_func": "(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
    "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_kvpacked_func": "(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
    "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_func": "(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), "
    "softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    "flash_attn_varlen_qkvpacked_func": "(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, "
    "causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, "
    "return_attn_probs=False)",
    "flash_attn_varlen_kvpacked_func": "(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
    "dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
    "deterministic=False, return_attn_probs=False)",
    "flash_attn_varlen_func": "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
    "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
    "deterministic=False, return_attn_probs=False, block_table=None)",
    "flash_attn_with_kvcache": "(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, "
    "cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, "
    "causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, "
    "return_softmax_lse=False)",
}


# flash-attn 2.8.3's private functions (flash_attn_interface.py), which libraries call directly; the varlen
# forward's trailing num_splits is 2.8.4's.
FLASH_ATTN_2_8_PRIVATE = {
    "_flash_attn_forward": "(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, "
    "softcap, alibi_slopes, return_softmax)",
    "_flash_attn_backward": "(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, "
    "window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state=None)",
    "_flash_attn_varlen_forward": "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, "
    "softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, "
    "return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False, num_splits=0)",
    "_flash_attn_varlen_backward": "(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, "
    "max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap, "
    "alibi_slopes, deterministic, rng_state=None, zero_tensors=False)",
    "_get_block_size_n": "(device, head_dim, is_dropout, is_causal)",
}

# flash-attn 2.8.3's flash_attn/layers/rotary.py.
FLASH_ATTN_2_8_ROTARY = {
    "apply_rotary_emb": "(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, "
    "max_seqlen=None)",
    "apply_rotary_emb_qkv_": "(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0, "
    "num_heads_q=None)",
    "apply_rotary_emb_kv_": "(kv, cos, sin, interleaved=False, seqlen_offsets=0)",
    "apply_rotary_emb_torch": "(x, cos, sin, interleaved=False)",
    "RotaryEmbedding": "(dim, base=10000.0, interleaved=False, scale_base=None, device=None)",
}

EXTENSION = ", *, sinks=None)"  # after flash-attn 2.8's parameters; keyword-only, so no positional call changes

# torch.nn.functional.scaled_dot_product_attention: 3 to 6 positional arguments, then scale and enable_gqa by keyword.
TORCH_SDPA = "(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False"


def extended(upstream: str) -> str:
    return upstream.removesuffix(")") + EXTENSION


def plain(fn) -> str:
    """The signature without annotations, as flash-attn spells it."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2_8))
def test_signature_matches_flash_attn(name):
    assert plain(getattr(flash_attn_metal, name)) == extended(FLASH_ATTN_2_8[name])


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2_8_PRIVATE))
def test_private_signature_matches_flash_attn(name):
    assert plain(getattr(flash_attn_interface, name)) == FLASH_ATTN_2_8_PRIVATE[name]


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2_8_ROTARY))
def test_rotary_signature_matches_flash_attn(name):
    assert plain(getattr(rotary, name)) == FLASH_ATTN_2_8_ROTARY[name]


def test_flash_attn_interface_serves_the_public_functions_and_the_wrapped_aliases():
    assert all(getattr(flash_attn_interface, name) is getattr(flash_attn_metal, name) for name in FLASH_ATTN_2_8)
    for name in ("forward", "backward", "varlen_forward", "varlen_backward"):
        assert getattr(flash_attn_interface, f"_wrapped_flash_attn_{name}") is getattr(flash_attn_interface,
                                                                                      f"_flash_attn_{name}")
    assert all(hasattr(flash_attn_interface, name) for name in flash_attn_interface.__all__)


def test_a_changed_default_or_a_misplaced_extension_would_be_caught():
    def drifted(q, k, v, dropout_p=0.1, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None):
        pass

    def sinks_in_the_middle(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, sinks=None,
                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                            return_attn_probs=False):
        pass

    def sinks_positional(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, deterministic=False, return_attn_probs=False, sinks=None):
        pass

    for fn in (drifted, sinks_in_the_middle, sinks_positional):
        assert plain(fn) != extended(FLASH_ATTN_2_8["flash_attn_func"])
    assert plain(flash_attn_metal.flash_attn_func) == extended(FLASH_ATTN_2_8["flash_attn_func"])


def test_sdpa_keeps_torchs_calling_convention(monkeypatch):
    assert plain(flash_attn_metal.scaled_dot_product_attention) == TORCH_SDPA + ", sinks=None)"
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "reference")
    q = torch.randn(1, 1, 2, 8)
    for sdpa in (torch.nn.functional.scaled_dot_product_attention, flash_attn_metal.scaled_dot_product_attention):
        sdpa(q, q, q, None, 0.0, False, scale=0.5, enable_gqa=False)
        with pytest.raises(TypeError):
            sdpa(q, q, q, None, 0.0, False, 0.5)  # scale is keyword-only in torch


def test_bert_padding_signatures():
    assert plain(bert_padding.unpad_input) == "(hidden_states, attention_mask, unused_mask=None)"
    assert plain(bert_padding.pad_input) == "(hidden_states, indices, batch, seqlen)"
    assert plain(bert_padding.index_first_axis) == "(x, indices)"


def test_the_package_exports_the_flash_attn_surface():
    assert set(FLASH_ATTN_2_8) <= set(flash_attn_metal.__all__)
    assert {"bert_padding", "stats", "reset_stats", "__version__", "scaled_dot_product_attention", "patch_sdpa",
            "patch_sdpa_globally"} <= set(flash_attn_metal.__all__)
    assert all(hasattr(flash_attn_metal, name) for name in flash_attn_metal.__all__)
    assert isinstance(flash_attn_metal.stats(), dict)


def test_importing_the_package_stays_light():
    heavy = ("flash_attn_metal.emulator", "flash_attn_metal.kernels", "flash_attn_metal.runtime", "flash_attn_metal.ops")
    code = (
        "import sys, flash_attn_metal\n"
        f"print(sorted(m for m in sys.modules if m.startswith({heavy!r})))\n"
        "flash_attn_metal.routing.kernels()\n"  # the kernels load on first use
        f"print(any(m.startswith({heavy!r}) for m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]
