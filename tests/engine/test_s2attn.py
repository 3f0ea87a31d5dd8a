"""S2-Attn against a dense float64 reference written independently of engine/s2attn.py.

The reference builds the full (B, H, L, L) permission matrix element by element from the issue's definition of the
segments, then runs an explicit masked softmax; nothing is shared with the implementation under test.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine.s2attn import S2_ATTENTION, s2_attention_forward
from tests.conftest import tiny_llama


def reference_permission(
    seq_len: int, num_heads: int, ratio: float, key_valid: torch.Tensor, s2: bool
) -> torch.Tensor:
    """(B, H, L, L) bool: may query i of head h attend key j. Loops on purpose: slow but obviously right."""
    bsz = key_valid.shape[0]
    group = int(seq_len * ratio)
    allowed = torch.zeros(bsz, num_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(num_heads):
        shifted = h >= num_heads - num_heads // 2
        for i in range(seq_len):
            for j in range(i + 1):
                if s2 and group >= 2:
                    if shifted:
                        half = group // 2
                        seg_i = 0 if i < half else 1 + (i - half) // group
                        seg_j = 0 if j < half else 1 + (j - half) // group
                    else:
                        seg_i, seg_j = i // group, j // group
                    if seg_i != seg_j:
                        continue
                allowed[:, h, i, j] = key_valid[:, j]
    return allowed


def reference_attention(q, k, v, key_valid, ratio, s2):
    """Dense masked attention in float64; rows with no permitted key give zeros. q (B,H,L,D), k/v (B,KV,L,D)."""
    bsz, heads, seq_len, dim = q.shape
    rep = heads // k.shape[1]
    k = torch.stack([k[:, h // rep] for h in range(heads)], dim=1)
    v = torch.stack([v[:, h // rep] for h in range(heads)], dim=1)
    allowed = reference_permission(seq_len, heads, ratio, key_valid, s2)
    scores = (q @ k.transpose(-1, -2)) / dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = weights @ v  # (B, H, L, D)
    return out.transpose(1, 2)  # (B, L, H, D)


def fake_module(ratio: float = 0.25, training: bool = True) -> types.SimpleNamespace:
    return types.SimpleNamespace(config=types.SimpleNamespace(s2_group_size_ratio=ratio), training=training)


def random_qkv(bsz, heads, kv_heads, seq_len, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(bsz, h, seq_len, dim, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


CASES = [
    # (batch, heads, kv_heads, seq_len, ratio, pad_lengths)
    (1, 4, 4, 32, 0.25, None),  # divisible, MHA
    (1, 9, 3, 37, 0.25, None),  # SmolLM2 heads: odd H, GQA 3:1, odd L not divisible by G
    (2, 6, 2, 29, 0.25, [0, 7]),  # right padding in a batch of 2
    (3, 5, 5, 24, 0.5, [3, 0, 24 - 2]),  # ratio 1/2, one row almost all padding
    (1, 3, 1, 7, 0.25, None),  # G = 1 < 2: plain causal
    (2, 8, 4, 41, 0.2, [5, 11]),  # G = 8, odd tail
    (1, 1, 1, 16, 0.25, None),  # a single head: nothing shifted
]


def key_valid_for(bsz, seq_len, pads):
    valid = torch.ones(bsz, seq_len, dtype=torch.bool)
    for b, pad in enumerate(pads or []):
        if pad:
            valid[b, seq_len - pad :] = False
    return valid


@pytest.mark.parametrize("bsz,heads,kv_heads,seq_len,ratio,pads", CASES)
def test_forward_and_backward_match_dense_reference(bsz, heads, kv_heads, seq_len, ratio, pads):
    q, k, v = random_qkv(bsz, heads, kv_heads, seq_len)
    valid = key_valid_for(bsz, seq_len, pads)
    mask = None if pads is None else valid.long()
    out, _ = s2_attention_forward(fake_module(ratio), q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    ref = reference_attention(q, k, v, valid, ratio, s2=True)
    assert out.shape == (bsz, seq_len, heads, q.shape[-1])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)


def test_s2_really_differs_from_full_attention():
    """Guard against a vacuous pass: with G < L the S2 output must differ from dense causal attention."""
    q, k, v = random_qkv(1, 4, 2, 32)
    out, _ = s2_attention_forward(fake_module(0.25), q, k, v, None)
    full = reference_attention(q, k, v, torch.ones(1, 32, dtype=torch.bool), 0.25, s2=False)
    assert not torch.allclose(out, full)


def test_eval_mode_is_full_causal_attention():
    q, k, v = random_qkv(2, 6, 3, 25)
    valid = key_valid_for(2, 25, [0, 4])
    out, _ = s2_attention_forward(fake_module(0.25, training=False), q, k, v, valid.long())
    ref = reference_attention(q, k, v, valid, 0.25, s2=False)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_kv_cache_decoding_is_full_attention_even_in_training_mode():
    """One new query against 20 cached keys: the query sits at the last position and sees every valid key."""
    q_full, k, v = random_qkv(1, 4, 2, 20)
    q = q_full[:, :, -1:]
    out, _ = s2_attention_forward(fake_module(0.25, training=True), q, k, v, None)
    ref = reference_attention(q_full, k, v, torch.ones(1, 20, dtype=torch.bool), 0.25, s2=False)[:, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_no_future_leakage():
    """Perturbing the token at j never changes outputs at i < j, including j at the very end (roll wrap-around)."""
    seq_len = 33
    q, k, v = (t.detach() for t in random_qkv(1, 9, 3, seq_len))
    base, _ = s2_attention_forward(fake_module(0.25), q, k, v, None)
    for j in [1, 4, 8, 16, 31, 32]:
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[:, :, j] += 3.0
        v2[:, :, j] -= 2.0
        q2[:, :, j] *= -1
        out, _ = s2_attention_forward(fake_module(0.25), q2, k2, v2, None)
        assert torch.equal(out[:, :j], base[:, :j]), f"outputs before position {j} changed"
        assert not torch.equal(out[:, j:], base[:, j:])


def test_padding_rows_do_not_change_valid_rows():
    """Right padding must be exact: a padded batch row equals the same sequence run alone, on its valid part."""
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, 24))
    valid = key_valid_for(2, 24, [0, 8])
    batched, _ = s2_attention_forward(fake_module(0.25), q, k, v, valid.long())
    # the padded row alone, padding still present but as its own single-row batch
    alone, _ = s2_attention_forward(fake_module(0.25), q[1:], k[1:], v[1:], valid[1:].long())
    torch.testing.assert_close(batched[1:], alone)
    assert torch.isfinite(batched).all()


def test_rejects_heads_not_multiple_of_kv_heads():
    q, k, v = random_qkv(1, 5, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        s2_attention_forward(fake_module(), q, k, v, None)


def test_rejects_bad_ratio():
    q, k, v = random_qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match="s2_group_size_ratio"):
        s2_attention_forward(fake_module(ratio=1.5), q, k, v, None)


def test_registered_with_transformers():
    assert S2_ATTENTION in AttentionInterface._global_mapping
    assert S2_ATTENTION in AttentionMaskInterface._global_mapping


def test_model_level_s2_matches_reference_path_and_switches_with_mode():
    """A whole tiny Llama: S2 in train mode equals the same weights run through the dense reference; eval == sdpa."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    s2_model = tiny_llama(seed=1, attn=S2_ATTENTION, heads=6, kv_heads=2).double()
    sdpa_model = tiny_llama(seed=1, attn="sdpa", heads=6, kv_heads=2).double()

    def reference_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        valid = (
            torch.ones(query.shape[0], query.shape[2], dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        return reference_attention(query, key, value, valid, 0.25, s2=module.training), None

    AttentionInterface.register("s2_reference_test", reference_fn)
    AttentionMaskInterface.register("s2_reference_test", AttentionMaskInterface._global_mapping[S2_ATTENTION])
    ref_model = tiny_llama(seed=1, attn="s2_reference_test", heads=6, kv_heads=2).double()

    s2_model.train(), ref_model.train()
    out = s2_model(ids, attention_mask=mask).logits
    ref = ref_model(ids, attention_mask=mask).logits
    valid_rows = mask.bool()
    torch.testing.assert_close(out[valid_rows], ref[valid_rows], rtol=1e-9, atol=1e-9)
    out.sum().backward(), ref.sum().backward()
    for (name, p), (_, rp) in zip(s2_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-8, atol=1e-9, msg=name)

    s2_model.eval()
    torch.testing.assert_close(
        s2_model(ids, attention_mask=mask).logits[valid_rows], sdpa_model(ids, attention_mask=mask).logits[valid_rows]
    )


def test_mistral_uses_the_same_attention_hook():
    """Mistral-style models (no sliding window) select S2 the same way: train mode differs, eval equals sdpa."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=None,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    s2 = AutoModelForCausalLM.from_config(cfg, attn_implementation=S2_ATTENTION)
    sdpa = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")  # config is shared
    sdpa.load_state_dict(s2.state_dict())
    ids = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        train_logits = s2.train()(ids).logits
        eval_logits = s2.eval()(ids).logits
        torch.testing.assert_close(eval_logits, sdpa.eval()(ids).logits)
    assert not torch.allclose(train_logits, eval_logits)
