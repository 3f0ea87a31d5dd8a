"""S2-Attn against a dense float64 reference written independently of engine/model/s2attn.py.

The reference builds the full (B, H, L, L) permission matrix element by element from the issue's definition of the
segments, then runs an explicit masked softmax; nothing is shared with the implementation under test. The group is
the target's G_t (`config.s2_group_size`) when the config has one, else floor(L * r) (older configs); padded query
rows output zeros.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from engine.model import s2attn
from engine.model.s2attn import MAX_MASK_ELEMENTS, S2_ATTENTION, s2_attention_forward
from engine.training.train import train
from tests.families import FAMILY_NAMES, tiny_family_model
from tests.support.models import make_workspace, tiny_llama, train_config


def reference_permission(
    seq_len: int, num_heads: int, ratio: float, key_valid: torch.Tensor, s2: bool, target_group: int | None = None
) -> torch.Tensor:
    """(B, H, L, L) bool: may query i of head h attend key j. Loops on purpose: slow but obviously right.

    The group is `target_group` when given (and L <= target_group means one group: plain causal), else floor(L*r).
    A padded query (key_valid[i] false) attends to nothing, so its output is zeros.
    """
    bsz = key_valid.shape[0]
    group = int(seq_len * ratio) if target_group is None else target_group
    if target_group is not None and seq_len <= target_group:
        s2 = False
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
                allowed[:, h, i, j] = key_valid[:, j] & key_valid[:, i]
    return allowed


def reference_attention(q, k, v, key_valid, ratio, s2, target_group=None):
    """Dense masked attention in float64; rows with no permitted key give zeros. q (B,H,L,D), k/v (B,KV,L,D)."""
    bsz, heads, seq_len, dim = q.shape
    rep = heads // k.shape[1]
    k = torch.stack([k[:, h // rep] for h in range(heads)], dim=1)
    v = torch.stack([v[:, h // rep] for h in range(heads)], dim=1)
    allowed = reference_permission(seq_len, heads, ratio, key_valid, s2, target_group)
    scores = (q @ k.transpose(-1, -2)) / dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = weights @ v  # (B, H, L, D)
    return out.transpose(1, 2)  # (B, L, H, D)


def fake_module(ratio: float = 0.25, training: bool = True, group: int | None = None) -> types.SimpleNamespace:
    """An attention layer stand-in; `group` plays `config.s2_group_size` (absent when None, as in old configs)."""
    config = types.SimpleNamespace(s2_group_size_ratio=ratio)
    if group is not None:
        config.s2_group_size = group
    return types.SimpleNamespace(config=config, training=training)


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
    out = check_against_reference(fake_module(ratio), q, k, v, valid, {"ratio": ratio, "s2": True})
    assert out.shape == (bsz, seq_len, heads, q.shape[-1])


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


def test_an_active_sliding_window_is_refused_and_an_inactive_one_changes_nothing():
    """Mistral/Qwen layers pass their `sliding_window`: one shorter than the keys would be ignored silently."""
    q, k, v = random_qkv(1, 4, 2, 16)
    with pytest.raises(ValueError, match="sliding windows"):
        s2_attention_forward(fake_module(), q, k, v, None, sliding_window=8)
    out, _ = s2_attention_forward(fake_module(), q, k, v, None, sliding_window=16)
    assert torch.equal(out, s2_attention_forward(fake_module(), q, k, v, None)[0])


def test_rejects_bad_ratio():
    q, k, v = random_qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match="s2_group_size_ratio"):
        s2_attention_forward(fake_module(ratio=1.5), q, k, v, None)


def test_registered_with_transformers():
    assert S2_ATTENTION in AttentionInterface._global_mapping
    assert S2_ATTENTION in AttentionMaskInterface._global_mapping


MODEL_CASES = [
    # (family, heads, kv_heads, seq_len, pads): every family with odd heads, GQA 3:1, an odd length and right
    # padding; Llama also with even heads, GQA 3:1 and left padding (the blockwise-mask path)
    *((family, 3, 1, 29, "right") for family in FAMILY_NAMES),
    ("llama", 6, 2, 30, "left"),
]


@pytest.mark.parametrize("family,heads,kv_heads,seq_len,pads", MODEL_CASES)
def test_model_level_s2_matches_reference_path_and_switches_with_mode(family, heads, kv_heads, seq_len, pads):
    """A whole tiny model of each family: S2 in train mode equals the same weights run through the dense reference
    (forward and every gradient); eval == sdpa. Qwen2's biases and Qwen3's q/k norms and explicit head_dim sit in
    the projections, before the attention function, so the same reference covers them."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, seq_len))
    mask = torch.ones_like(ids)
    if pads == "left":
        mask[1, :6] = 0
    else:
        mask[1, -6:] = 0
    shape = dict(heads=heads, kv_heads=kv_heads)
    s2_model = tiny_family_model(family, seed=1, attn=S2_ATTENTION, **shape).double()
    sdpa_model = tiny_family_model(family, seed=1, attn="sdpa", **shape).double()

    def reference_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        if attention_mask is None:
            valid = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool)
        elif attention_mask.dim() == 1:  # s2_mask's right-padded form: the count of valid keys per row
            valid = torch.arange(query.shape[2])[None, :] < attention_mask[:, None]
        else:
            valid = attention_mask.bool()
        return reference_attention(query, key, value, valid, 0.25, s2=module.training), None

    AttentionInterface.register("s2_reference_test", reference_fn)
    AttentionMaskInterface.register("s2_reference_test", AttentionMaskInterface._global_mapping[S2_ATTENTION])
    ref_model = tiny_family_model(family, seed=1, attn="s2_reference_test", **shape).double()

    s2_model.train(), ref_model.train()
    out = s2_model(ids, attention_mask=mask).logits
    ref = ref_model(ids, attention_mask=mask).logits
    valid_rows = mask.bool()
    torch.testing.assert_close(out[valid_rows], ref[valid_rows], rtol=1e-9, atol=1e-9)
    (out * valid_rows[..., None]).sum().backward(), (ref * valid_rows[..., None]).sum().backward()
    for (name, p), (_, rp) in zip(s2_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, rp.grad, rtol=1e-8, atol=1e-9, msg=name)

    s2_model.eval()
    full = sdpa_model(ids, attention_mask=mask).logits[valid_rows]
    torch.testing.assert_close(s2_model(ids, attention_mask=mask).logits[valid_rows], full)
    assert not torch.allclose(out[valid_rows].detach(), full)  # train mode really was S2, not full attention


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


# ----------------------------------------------------------------------------- the target's group (issue 14, part 1)


def check_against_reference(module, q, k, v, valid, ref_kwargs, rtol=1e-10, atol=1e-10):
    """Forward and backward of `s2_attention_forward` against `reference_attention(**ref_kwargs)`."""
    mask = None if bool(valid.all()) else valid.long()
    out, _ = s2_attention_forward(module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    ref = reference_attention(q, k, v, valid, **ref_kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10)
    return out


TARGET_CASES = [
    # (batch, heads, kv_heads, seq_len, target_group, pad_lengths)
    (1, 9, 3, 24, 32, None),  # short record (L < G_t): one group, odd H, GQA 3:1
    (2, 6, 2, 32, 32, [0, 5]),  # L == G_t: still one group, right padding
    (2, 5, 5, 33, 32, [0, 9]),  # L = G_t + 1: unshifted [0,32) [32,33); shifted [0,16) [16,33)
    (1, 9, 3, 77, 32, None),  # middle length: groups of 32, not floor(77/4) = 19
    (2, 8, 4, 90, 32, [3, 40]),  # middle length, padding, two full groups and a tail
    (2, 4, 2, 128, 32, [0, 17]),  # the target length itself
    (1, 4, 4, 40, 1, None),  # G_t < 2: plain causal
    (1, 1, 1, 50, 16, None),  # one head: nothing shifted
]


@pytest.mark.parametrize("bsz,heads,kv_heads,seq_len,target_group,pads", TARGET_CASES)
def test_target_group_matches_dense_reference(bsz, heads, kv_heads, seq_len, target_group, pads):
    q, k, v = random_qkv(bsz, heads, kv_heads, seq_len, seed=3)
    valid = key_valid_for(bsz, seq_len, pads)
    module = fake_module(0.25, group=target_group)
    check_against_reference(module, q, k, v, valid, dict(ratio=0.25, s2=True, target_group=target_group))


@pytest.mark.parametrize("pads", [None, [0, 4], [9, 0]])
def test_short_sequence_gets_exactly_full_causal_attention(pads):
    """A 24-token batch in a run whose target group is 64: plain causal attention, although floor(24/4) = 6."""
    q, k, v = random_qkv(2, 9, 3, 24, seed=4)
    valid = key_valid_for(2, 24, pads)
    out = check_against_reference(fake_module(0.25, group=64), q, k, v, valid, dict(ratio=0.25, s2=False))
    legacy, _ = s2_attention_forward(fake_module(0.25), q, k, v, None if pads is None else valid.long())
    assert not torch.allclose(out, legacy)  # the old rule really used groups of 6 here


@pytest.mark.parametrize("ratio", [0.25, 0.125])
def test_at_the_target_length_the_target_group_is_the_ratio_rule(ratio):
    """L = target_context: G_t = floor(L * r), so the output and gradients are bit-identical to the legacy rule."""
    target = 128
    q, k, v = random_qkv(2, 6, 2, target, seed=5)
    mask = key_valid_for(2, target, [0, 30]).long()
    outs, grads = [], []
    for module in (fake_module(ratio, group=int(target * ratio)), fake_module(ratio)):
        out, _ = s2_attention_forward(module, q, k, v, mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    assert torch.equal(outs[0], outs[1])
    for g, legacy in zip(*grads):
        assert torch.equal(g, legacy)


def test_middle_length_uses_the_target_group_not_a_fraction_of_its_own_length():
    q, k, v = random_qkv(1, 4, 2, 77, seed=6)
    valid = torch.ones(1, 77, dtype=torch.bool)
    out = check_against_reference(
        fake_module(0.25, group=32), q, k, v, valid, dict(ratio=0.25, s2=True, target_group=32)
    )
    fraction = reference_attention(q, k, v, valid, 0.25, s2=True)  # G = floor(77 / 4) = 19
    assert not torch.allclose(out, fraction)


@pytest.mark.parametrize(
    "group,ratio,message", [(-1, 0.25, "s2_group_size"), (16.0, 0.25, "s2_group_size"), (16, 1.5, "ratio")]
)
def test_rejects_bad_target_group_and_still_checks_the_ratio(group, ratio, message):
    q, k, v = random_qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match=message):
        s2_attention_forward(fake_module(ratio, group=group), q, k, v, None)


def test_model_with_target_group_trains_short_batches_with_full_attention():
    """Whole tiny Llama in train mode: a 30-token padded batch with G_t = 64 gives sdpa's logits; G_t = 8 does not."""
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    s2_model = tiny_llama(seed=1, attn=S2_ATTENTION, heads=6, kv_heads=2).double().train()
    sdpa_model = tiny_llama(seed=1, attn="sdpa", heads=6, kv_heads=2).double().train()
    valid_rows = mask.bool()
    with torch.no_grad():
        s2_model.config.s2_group_size = 64
        torch.testing.assert_close(
            s2_model(ids, attention_mask=mask).logits[valid_rows],
            sdpa_model(ids, attention_mask=mask).logits[valid_rows],
        )
        s2_model.config.s2_group_size = 8
        assert not torch.allclose(
            s2_model(ids, attention_mask=mask).logits[valid_rows],
            sdpa_model(ids, attention_mask=mask).logits[valid_rows],
        )


def test_train_stores_the_target_group_on_the_config(tmp_path):
    ws = make_workspace(tmp_path)
    model = tiny_llama(seed=0)
    train(train_config(ws, max_steps=1, target_context=256, s2_group_size_ratio=0.25), model=model)
    assert model.config.s2_group_size == 64


# ----------------------------------------------------------------------------- padding without O(L^2) masks (part 2)


def valid_from_pads(seq_len: int, rows: list[tuple[int, int]]) -> torch.Tensor:
    """(B, L) bool from (left_pad, right_pad) per row."""
    valid = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    for b, (left, right) in enumerate(rows):
        valid[b, left : seq_len - right] = True
    return valid


PAD_ROWS = {
    "left": [(0, 0), (7, 0), (20, 0)],
    "right": [(0, 0), (0, 7), (0, 20)],
    "mixed": [(5, 0), (0, 6), (3, 4)],
    "whole_rows": [(41, 0), (0, 41), (2, 0)],  # a row that is all padding, either way
}


def with_hole(valid: torch.Tensor) -> torch.Tensor:
    """Inner padding too (nothing produces it today, but the mask contract allows it)."""
    valid = valid.clone()
    valid[-1, 10:14] = False
    return valid


@pytest.mark.parametrize("kind", [*PAD_ROWS, "hole"])
@pytest.mark.parametrize("mode", ["eval", "train_ratio", "train_target"])
def test_padding_matches_dense_reference(kind, mode):
    seq_len = 41
    valid = (
        with_hole(valid_from_pads(seq_len, PAD_ROWS["mixed"]))
        if kind == "hole"
        else valid_from_pads(seq_len, PAD_ROWS[kind])
    )
    q, k, v = random_qkv(valid.shape[0], 6, 3, seq_len, seed=7)
    module, ref = {
        "eval": (fake_module(0.25, training=False), dict(ratio=0.25, s2=False)),
        "train_ratio": (fake_module(0.25), dict(ratio=0.25, s2=True)),
        "train_target": (fake_module(0.25, group=16), dict(ratio=0.25, s2=True, target_group=16)),
    }[mode]
    check_against_reference(module, q, k, v, valid, ref)


@pytest.mark.parametrize("budget", [1, 50, 300])
@pytest.mark.parametrize("kind", ["left", "mixed"])
def test_many_small_blocks_change_nothing(monkeypatch, budget, kind):
    """Blocks of 1, a few and several query rows (budget in mask entries) in eval, S2 training and decode."""
    monkeypatch.setattr(s2attn, "MAX_MASK_ELEMENTS", budget)
    seq_len = 41
    valid = valid_from_pads(seq_len, PAD_ROWS[kind])
    q, k, v = random_qkv(3, 4, 2, seq_len, seed=8)
    check_against_reference(fake_module(0.25, training=False), q, k, v, valid, dict(ratio=0.25, s2=False))
    check_against_reference(fake_module(0.25, group=16), q, k, v, valid, dict(ratio=0.25, s2=True, target_group=16))
    q_new = q.detach()[:, :, -5:]
    out, _ = s2_attention_forward(fake_module(training=False), q_new, k, v, valid.long())
    ref = reference_attention(q.detach(), k.detach(), v.detach(), valid, 0.25, s2=False)[:, -5:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kind", ["left", "right", "mixed", None])
def test_kv_cache_decoding_with_padding_is_full_attention(new_tokens, training, kind):
    """Queries for the last `new_tokens` positions against all cached keys, padded as generation pads them."""
    seq_len = 30
    rows = [(0, 0), (0, 0)] if kind is None else PAD_ROWS[kind][:2]
    valid = valid_from_pads(seq_len, [(left, 0) for left, _ in rows] if kind == "right" else rows)
    if kind == "right":  # right padding in the cache, then new valid tokens after it (what a cache would hold)
        valid[1, 18 : seq_len - new_tokens] = False
    q_full, k, v = random_qkv(2, 6, 2, seq_len, seed=9)
    q = q_full[:, :, -new_tokens:]
    mask = None if kind is None else valid.long()
    out, _ = s2_attention_forward(fake_module(0.25, training=training, group=8), q, k, v, mask)
    ref = reference_attention(q_full, k, v, valid, 0.25, s2=False)[:, -new_tokens:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_right_padding_and_no_padding_keep_the_mask_free_kernel(monkeypatch):
    """Training batches are right-padded (PadCollator): through s2_mask (which hands their lengths to the layers)
    they must not pay for a mask; left padding does need one."""
    calls: list[bool] = []
    real = s2attn.F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        calls.append(attn_mask is not None)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(s2attn, "F", types.SimpleNamespace(scaled_dot_product_attention=recording))
    q, k, v = random_qkv(3, 6, 2, 41, seed=10)
    right = valid_from_pads(41, PAD_ROWS["right"])
    right_and_empty = valid_from_pads(41, [(0, 41), (0, 0), (0, 3)])  # an all-padding row is right-padded too
    for module in (fake_module(training=False), fake_module(), fake_module(group=16)):
        for mask in (right.long(), right_and_empty.long(), None):
            calls.clear()
            s2_attention_forward(module, q, k, v, s2attn.s2_mask(3, 41, 41, attention_mask=mask))
            assert calls and not any(calls)
        calls.clear()
        left = valid_from_pads(41, PAD_ROWS["left"]).long()
        s2_attention_forward(module, q, k, v, s2attn.s2_mask(3, 41, 41, attention_mask=left))
        assert any(calls)


def recording_sdpa(monkeypatch) -> list[dict]:
    """Spy on s2attn's SDPA calls: each call's keyword arguments, plus its K heads as `kv_heads`."""
    calls: list[dict] = []
    real = s2attn.F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append({**kwargs, "kv_heads": k.shape[1]})
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(s2attn, "F", types.SimpleNamespace(scaled_dot_product_attention=recording))
    return calls


@pytest.mark.parametrize("training", [False, True])
def test_a_single_unpadded_decoding_query_calls_sdpa_without_mask_and_with_gqa(monkeypatch, training):
    """A decoding step (Tq = 1, every cached key valid): one SDPA call, no mask, not is_causal (the query sees every
    key), K/V with their own 2 heads and enable_gqa (no repeat); equal to the dense float64 reference."""
    calls = recording_sdpa(monkeypatch)
    q_full, k, v = random_qkv(2, 6, 2, 30, seed=11)
    out, _ = s2_attention_forward(fake_module(0.25, training=training, group=8), q_full[:, :, -1:], k, v, None)
    assert calls == [{"dropout_p": 0.0, "scale": None, "enable_gqa": True, "kv_heads": 2}]
    ref = reference_attention(q_full, k, v, torch.ones(2, 30, dtype=torch.bool), 0.25, s2=False)[:, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_sdpa_call_gets_unrepeated_kv_on_cpu(monkeypatch, mode):
    """CPU SDPA takes enable_gqa in all its calls (masked blocks included): K/V are never repeated; S2's head halves
    get whole KV groups when they fall on a group boundary (H 6, KV 2: split at 3 = one group)."""
    calls = recording_sdpa(monkeypatch)
    q, k, v = random_qkv(3, 6, 2, 41, seed=12)
    valid = valid_from_pads(41, PAD_ROWS["mixed"])  # left and right: the blockwise masked path
    module = fake_module(0.25, training=mode == "train", group=16)
    ref = {"eval": dict(ratio=0.25, s2=False), "train": dict(ratio=0.25, s2=True, target_group=16)}[mode]
    check_against_reference(module, q, k, v, valid, ref)
    assert calls and all(c.get("enable_gqa") for c in calls)
    assert {c["kv_heads"] for c in calls} == ({2} if mode == "eval" else {1})


def test_without_native_gqa_kv_are_repeated_once_per_blockwise_call(monkeypatch):
    """Where the serving kernel takes no GQA (CUDA's efficient kernel for masked calls), K/V reach SDPA repeated to
    the query heads and without enable_gqa; the result is the same."""
    monkeypatch.setattr(s2attn, "native_gqa", lambda *args: False)
    calls = recording_sdpa(monkeypatch)
    q, k, v = random_qkv(3, 6, 2, 41, seed=12)
    valid = valid_from_pads(41, PAD_ROWS["mixed"])
    check_against_reference(fake_module(0.25, training=False), q, k, v, valid, dict(ratio=0.25, s2=False))
    assert calls and all("enable_gqa" not in c and c["kv_heads"] == 6 for c in calls)


@pytest.mark.parametrize("pads", [None, "right", "left"])
def test_the_padding_layout_is_read_once_per_forward_not_per_layer(monkeypatch, pads):
    """s2_mask inspects the padding (one host sync); the layers do not, for None, right padding ((B,) lengths) and
    left padding ((B, T) mask) alike."""
    seen: list[int] = []
    real = s2attn._padding_layout
    monkeypatch.setattr(s2attn, "_padding_layout", lambda valid: seen.append(1) or real(valid))
    model = tiny_family_model("llama", seed=1, attn=S2_ATTENTION, layers=3).train()
    ids = torch.randint(3, 128, (2, 20))
    mask = torch.ones_like(ids)
    if pads == "right":
        mask[1, -5:] = 0
    elif pads == "left":
        mask[1, :5] = 0
    model(ids, attention_mask=mask)
    assert len(seen) == 1
    built = s2attn.s2_mask(2, 20, 20, attention_mask=mask.bool())
    expected = {None: None, "right": (2,), "left": (2, 20)}[pads]
    assert (built if built is None else tuple(built.shape)) == expected


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) any aten op returns: a deterministic, allocator-free memory probe."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.elements = max(self.elements, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("mode,pad", [("eval", "left"), ("train", "left"), ("train", "right"), ("decode", "left")])
def test_padding_never_allocates_a_quadratic_tensor(mode, pad):
    """8k tokens, 100 padded (B=1, H=2, D=16, float32; training includes the backward): every allocation stays within
    the block budget (2**24 entries), a quarter of L * L; the old dense path allocated a (1, 1, L, L) float bias
    (2**26 entries, 256 MiB) for eval with left padding."""
    seq_len, pad_len = 8192, 100
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq_len, 16, generator=gen, requires_grad=mode == "train") for _ in range(3))
    padded = slice(0, pad_len) if pad == "left" else slice(seq_len - pad_len, seq_len)
    valid = torch.ones(1, seq_len, dtype=torch.bool)
    valid[:, padded] = False
    queries = q[:, :, -1:] if mode == "decode" else q
    module = fake_module(0.25, training=mode == "train", group=2048)
    with LargestAllocation() as probe:
        out, _ = s2_attention_forward(module, queries, k, v, valid.long())
        if mode == "train":
            out.square().sum().backward()
    assert probe.elements <= MAX_MASK_ELEMENTS < seq_len * seq_len // 2
    assert torch.isfinite(out).all()
    if mode != "decode":
        assert not out[0, padded].any()  # padded query rows are zeros
    if mode == "eval":  # several blocks at this length: the last rows against a dense mask of only those rows
        rows = torch.arange(seq_len - 64, seq_len)
        allowed = valid[:, None, None, :] & (torch.arange(seq_len)[None, :] <= rows[:, None])  # (1, 1, 64, L)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=allowed)  # (1, H, 64, D)
        torch.testing.assert_close(out[:, rows], ref.transpose(1, 2))
