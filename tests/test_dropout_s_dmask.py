"""flash-attn's S_dmask convention, checked the way flash-attn's tests consume it.

The decoders below restate what upstream's tests/test_flash_attn.py does (convert_flash_attn_S_to_softmax,
normalize_flash_attn_S, get_dropout_fraction), written from its documented behaviour:
- `convert`: crop S_dmask to (seqlen_q, seqlen_k); zero the elements the causal/local window hides and those of
  padded rows and keys;
- `normalize`: the unnormalised |S| of key block j // n (n = flash_attn_interface._get_block_size_n) times
  exp(m - lse), with m the max of the row's scores over key blocks j // n .. last and lse the row's logsumexp,
  from q and k in fp32;
- `dropout_fraction`: dropped (S < 0) among the elements that are neither padded nor hidden by the window.

test_dropout_attention.py decodes the public functions' S_dmask with them.
"""

from __future__ import annotations

import math

import pytest
import torch

from flash_attn_metal import flash_attn_func, flash_attn_varlen_func, s_dmask
from flash_attn_metal.flash_attn_interface import _get_block_size_n
from flash_attn_metal.kernels import dropout


def hidden(sq: int, sk: int, q_lens: torch.Tensor, k_lens: torch.Tensor, causal: bool, window) -> torch.Tensor:
    """(b, 1, sq, sk): True where the causal/local window hides key j from query i, aligned to the bottom right
    of each sequence's own (q_len x k_len) matrix."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(sq).view(1, 1, -1, 1)
    j = torch.arange(sk).view(1, 1, 1, -1)
    diagonal = i + (k_lens - q_lens).view(-1, 1, 1, 1)
    out = torch.zeros(len(q_lens), 1, sq, sk, dtype=torch.bool)
    if right >= 0:
        out |= j > diagonal + right
    if left >= 0:
        out |= j < diagonal - left
    return out


def padding(sq: int, sk: int, q_lens: torch.Tensor, k_lens: torch.Tensor) -> torch.Tensor:
    """(b, 1, sq, sk): True on rows or keys past the sequence's lengths."""
    rows = torch.arange(sq).view(1, 1, -1, 1) >= q_lens.view(-1, 1, 1, 1)
    keys = torch.arange(sk).view(1, 1, 1, -1) >= k_lens.view(-1, 1, 1, 1)
    return rows | keys


def convert(S: torch.Tensor, sq: int, sk: int, q_lens, k_lens, causal=False, window=(-1, -1)) -> torch.Tensor:
    S = S[:, :, :sq, :sk]
    return S.masked_fill(hidden(sq, sk, q_lens, k_lens, causal, window) | padding(sq, sk, q_lens, k_lens), 0.0)


def normalize(unnormalised: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_lens, k_lens, causal=False,
              window=(-1, -1), block_n: int | None = None) -> torch.Tensor:
    """q (b, sq, h, d), k (b, sk, hk, d) padded; unnormalised (b, h, sq, sk). The softmax the S_dmask encodes."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    k = k.float().repeat_interleave(h // k.shape[2], dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float() / math.sqrt(d), k)
    scores = scores.masked_fill(hidden(sq, sk, q_lens, k_lens, causal, window) | padding(sq, sk, q_lens, k_lens),
                                -math.inf)
    n = block_n or _get_block_size_n(q.device, d, True, causal)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = lse.masked_fill(torch.isneginf(lse), math.inf)  # a row with no key: exp(m - lse) = 0, not NaN
    block_max = torch.stack([block.amax(-1) for block in scores.split(n, dim=-1)], dim=-1)
    running = block_max.flip(-1).cummax(-1).values.flip(-1)  # max over blocks j .. last
    parts = [a * torch.exp(running[..., j : j + 1] - lse) for j, a in enumerate(unnormalised.float().split(n, dim=-1))]
    return torch.cat(parts, dim=-1).masked_fill(padding(sq, sk, q_lens, k_lens), 0.0)


def dropout_fraction(kept: torch.Tensor, q_lens, k_lens, causal=False, window=(-1, -1)) -> float:
    sq, sk = kept.shape[-2:]
    valid = ~(hidden(sq, sk, q_lens, k_lens, causal, window) | padding(sq, sk, q_lens, k_lens)).expand_as(kept)
    return ((~kept & valid).sum() / valid.sum()).item()


def lengths(b: int, n: int) -> torch.Tensor:
    return torch.full((b,), n)


pytestmark = pytest.mark.usefixtures("reference_backend")


# ---- the convention on small cases computed by hand ----

def test_block_size_n_is_flash_attn_28s_for_a100_and_h100():
    dropout_sizes = {32: 128, 40: 64, 64: 64, 80: 64, 96: 64, 111: 32, 128: 32, 160: 64, 192: 64, 224: 64, 256: 64}
    for d, n in dropout_sizes.items():
        assert _get_block_size_n("mps", d, True, False) == n == _get_block_size_n(None, d, True, True)
    assert [_get_block_size_n(None, d, False, False) for d in (32, 64, 96, 128, 256)] == [128, 128, 64, 64, 64]
    with pytest.raises(ValueError, match="head_dim"):
        _get_block_size_n(None, 257, True, False)


def test_values_are_exp_of_score_minus_the_running_max_from_the_right():
    """One row, head dim 128 (blocks of 32 keys): keys 0..31 see the max of blocks 0..2, keys 64..95 only block 2's."""
    torch.manual_seed(0)
    d, sk = 128, 96
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = math.sqrt(d)  # score_j = k[j, 0]
    k = torch.zeros(1, sk, 1, d)
    k[0, :, 0, 0] = torch.linspace(-3.0, 3.0, sk).roll(40)  # the row max sits in block 1
    v = torch.randn(1, sk, 1, d)
    torch.manual_seed(5)
    seed, offset = dropout.draw_seed_offset()
    torch.manual_seed(5)
    out, lse, S = flash_attn_func(q, k, v, 0.3, return_attn_probs=True)
    assert S.shape == (1, 1, 128, 128) and S.dtype == q.dtype
    scores = k[0, :, 0, 0].double()
    block_max = scores.view(3, 32).amax(-1)
    running = torch.stack([block_max[j:].max() for j in range(3)]).repeat_interleave(32)
    keep = dropout.keep_grid(seed, offset, 0.3, 1, [0], range(1), sk)[0, 0, 0]
    expected = torch.where(keep, 1.0, -1.0) * torch.exp(scores - running)
    assert torch.allclose(S[0, 0, 0, :sk].double(), expected, rtol=1e-6, atol=0)
    assert (S[0, 0, 1:] == 0).all() and (S[0, 0, :, sk:] == 0).all()
    # the same values normalised with the whole row's max (one block) are not flash-attn's
    assert not torch.allclose(S[0, 0, 0, :sk].double().abs(), torch.exp(scores - scores.max()), rtol=1e-3)


def test_signs_are_the_kernels_keep_bits_for_the_calls_seed_and_offset():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 37, 3, 64), torch.randn(2, 45, 3, 64), torch.randn(2, 45, 3, 64)
    torch.manual_seed(7)
    seed, offset = dropout.draw_seed_offset()
    torch.manual_seed(7)
    _, _, S = flash_attn_func(q, k, v, 0.25, return_attn_probs=True)
    keep = dropout.keep_grid(seed, offset, 0.25, 3, range(2), range(37), 45)
    assert torch.equal(S[:, :, :37, :45] >= 0, keep)
    assert not torch.equal(S[:, :, :37, :45] >= 0, dropout.keep_grid(seed, offset + 1, 0.25, 3, range(2), range(37), 45))


def test_varlen_sequences_sit_at_their_own_origin():
    torch.manual_seed(2)
    cu_q = torch.tensor([0, 20, 20, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 33, 40, 40], dtype=torch.int32)  # sequence 1 has no queries, sequence 2 no keys
    q, k, v = torch.randn(50, 2, 32), torch.randn(40, 2, 32), torch.randn(40, 2, 32)
    torch.manual_seed(8)
    seed, offset = dropout.draw_seed_offset()
    torch.manual_seed(8)
    _, _, S = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 33, 0.2, return_attn_probs=True)
    assert S.shape == (3, 2, 128, 128)
    assert torch.equal(S[0, :, :20, :33] >= 0, dropout.keep_grid(seed, offset, 0.2, 2, [0], range(20), 33)[0])
    assert (S[0, :, 20:] == 0).all() and (S[0, :, :, 33:] == 0).all() and (S[1:] == 0).all()


def test_build_rejects_problems_without_dropout_state():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 1, 8)
    from flash_attn_metal.problem import AttentionProblem

    problem = AttentionProblem(q=q, k=q, v=q, softmax_scale=1.0, causal=False, window_left=-1, window_right=-1,
                               softcap=0.0, alibi_slopes=None, dropout_p=0.1, max_seqlen_q=4, max_seqlen_k=4)
    with pytest.raises(ValueError, match="seed, offset"):
        s_dmask.build(problem)
    assert s_dmask.build(AttentionProblem(**{**problem.__dict__, "dropout_rng": (1, 2)})).shape == (1, 1, 128, 128)


def test_decoders_recover_softmax_and_fraction_and_fail_with_the_wrong_block_size():
    torch.manual_seed(4)
    b, s, h, d, p = 2, 100, 2, 128, 0.3
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float16) for _ in range(3))
    _, _, S = flash_attn_func(q, k, v, p, return_attn_probs=True)
    lens = lengths(b, s)
    converted = convert(S, s, s, lens, lens)
    attn = normalize(converted.abs(), q, k, lens, lens)
    truth = torch.softmax(torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(d), dim=-1)
    assert (attn.double() - truth).abs().max().item() < 2e-3
    wrong = normalize(converted.abs(), q, k, lens, lens, block_n=2 * _get_block_size_n(None, d, True, False))
    assert (wrong.double() - truth).abs().max().item() > 1e-2
    assert abs(dropout_fraction(converted >= 0, lens, lens) - p) < 0.015
