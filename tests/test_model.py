"""MODEL: size, causality, initial loss, forward vs logits, looping, lanes, gates. Run: python3 -m pytest -q tests/test_model.py"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

from conftest import TINY


@pytest.fixture(scope="module")
def default_meta_model():
    # Shapes only: building the 34M model on the meta device skips the slow CPU orthogonal init.
    with torch.device("meta"):
        return tg.GPT(tg.Hyperparameters())


def randomized(h, seed: int = 0, recurrence: bool = False) -> tg.GPT:
    """A TINY model whose zero-initialised projections and gates are random too (a 'trained' model)."""
    torch.manual_seed(seed)
    m = tg.GPT(h)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.recurrence_active = recurrence
    return m.eval()


def test_default_parameter_count(default_meta_model):
    # The 04-27 record logs model_params:35945671; it allocates lane weights for all 11 layers,
    # we for the 3 that have lanes (8 x 6 = 48 fewer).
    assert sum(p.numel() for p in default_meta_model.parameters()) == 35_945_671 - 48
    pr1285 = dict(vocab_size=4096, ve_layers="9,10", num_loops=1, loop_start=4, loop_end=5, parallel_start_layer=0,
                  smear_gate_enabled=False, sparse_attn_gate_enabled=False)
    with torch.device("meta"):
        m = tg.GPT(dataclasses.replace(tg.Hyperparameters(), **pr1285))
    # PR #1285's 34,401,371 plus one skip pair (its looped order has 13 layers: 6 pairs, not 5)
    assert sum(p.numel() for p in m.parameters()) == 34_401_371 + 2 * 512


def test_default_virtual_layers(default_meta_model):
    m = default_meta_model
    assert m.virtual_layers() == list(range(11))
    m.recurrence_active = True
    try:
        assert m.virtual_layers() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
        assert m.skip_weights.shape == (8, 512) and m.parallel_post_lambdas.shape == (3, 2, 2)
    finally:
        m.recurrence_active = False


def test_virtual_layers_without_recurrence_layers():
    m = tg.GPT(dataclasses.replace(TINY, vocab_size=64, num_loops=0))
    m.recurrence_active = True
    assert m.virtual_layers() == [0, 1, 2, 3]
    m = tg.GPT(dataclasses.replace(TINY, vocab_size=64))  # recur 1,2
    m.recurrence_active = True
    assert m.virtual_layers() == [0, 1, 2, 1, 2, 3]


def test_tiny_model_structure():
    h = dataclasses.replace(TINY, vocab_size=128)
    m = tg.GPT(h)
    assert [b.attn.use_xsa for b in m.blocks] == [True] * 4
    assert [b.attn.use_xsa for b in tg.GPT(dataclasses.replace(h, xsa_last_n=1)).blocks] == [False] * 3 + [True]
    assert m.ve_layers == [2, 3] and len(m.ve_layer_scales) == 2
    assert m.blocks[0].attn.c_k.weight.shape == (h.num_kv_heads * h.head_dim, h.model_dim)
    assert m.blocks[0].mlp.fc.weight.shape == (int(h.mlp_mult * h.model_dim), h.model_dim)
    assert torch.all(m.blocks[0].attn.q_gain == h.qk_gain_init)
    assert not m.blocks[0].attn.proj.weight.any() and not m.blocks[0].mlp.proj.weight.any()  # zero init


@pytest.mark.parametrize("recurrence", [False, True])
def test_causality(tiny_h, recurrence):
    m = randomized(tiny_h, recurrence=recurrence)
    g = torch.Generator().manual_seed(1)
    T = 48
    x = torch.randint(0, tiny_h.vocab_size, (2, T), generator=g)
    with torch.no_grad():
        base = m.forward_logits(x)
        for t in (0, 5, 31, T - 1):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1 + torch.randint(0, tiny_h.vocab_size - 1, (2,), generator=g)) % tiny_h.vocab_size
            out = m.forward_logits(x2)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            diff = (out[:, t:] - base[:, t:]).abs().amax(dim=-1)  # (B, T-t)
            assert (diff[:, 0] > 1e-4).all()  # the changed position itself
            if t < T - 1:
                assert (diff[:, 1:].amax(dim=1) > 1e-4).all()  # and later positions, through attention


def test_recurrence_changes_the_function(tiny_h):
    m = randomized(tiny_h)
    x = torch.randint(0, tiny_h.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m.forward_logits(x)
        m.recurrence_active = True
        b = m.forward_logits(x)
    assert (a - b).abs().max() > 1e-3


def test_initial_loss_is_about_ln_vocab(tiny_h):
    torch.manual_seed(0)
    m = tg.GPT(tiny_h)
    x = torch.randint(0, tiny_h.vocab_size, (4, 64))
    y = torch.randint(0, tiny_h.vocab_size, (4, 64))
    with torch.no_grad():
        loss = m(x, y).item()
    assert abs(loss - math.log(tiny_h.vocab_size)) < 0.5


@pytest.mark.parametrize("recurrence", [False, True])
def test_forward_is_cross_entropy_of_forward_logits(tiny_h, recurrence):
    m = randomized(tiny_h, recurrence=recurrence)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, tiny_h.vocab_size, (3, 40), generator=g)
    y = torch.randint(0, tiny_h.vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        logits = m.forward_logits(x)
        loss = m(x, y)
    assert logits.shape == (3, 40, tiny_h.vocab_size)
    ref = F.cross_entropy(logits.reshape(-1, tiny_h.vocab_size).float(), y.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    # the softcap bounds the logits
    assert logits.abs().max() <= tiny_h.logit_softcap + 1e-4
    torch.testing.assert_close(m.logits(m.forward_hidden(x)), logits)


def test_build_model_on_cpu_is_fp32(tiny_h, rt_cpu):
    m = tg.build_model(tiny_h, rt_cpu)
    assert isinstance(m, tg.GPT)
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert {p.device.type for p in m.parameters()} == {"cpu"}
    assert m.recurrence_active is False


def test_rotary_rotates_only_rope_dims():
    rot = tg.Rotary(rope_dims=8, base=10000.0, train_seq_len=16, max_len=16)
    x = torch.randn(2, 16, 3, 32)
    y = rot(x)
    torch.testing.assert_close(y[..., 8:], x[..., 8:])  # the partial part is untouched
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))  # a rotation
    assert (y[:, 1:, :, :8] - x[:, 1:, :, :8]).abs().max() > 1e-3


def test_rotary_beyond_training_length_rescales():
    rot = tg.Rotary(rope_dims=8, base=10000.0, train_seq_len=16, max_len=16)
    x = torch.randn(1, 32, 2, 16)
    y = rot(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))


def test_rotary_two_dims_beyond_training_length():
    h = dataclasses.replace(TINY, vocab_size=64, rope_dims=2, train_seq_len=32, eval_seq_len=64, eval_stride=32,
                            ttt_chunk=2048, pre_quant_ttt_chunk=2048)
    h.validate()  # accepted as a configuration
    m = tg.GPT(h)
    with torch.no_grad():
        out = m.forward_logits(torch.zeros(1, 64, dtype=torch.long))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- gates and lanes

def _smear_model(h) -> tg.GPT:
    m = tg.GPT(dataclasses.replace(h, vocab_size=64))
    with torch.no_grad():  # an open gate (at init it is exactly closed: lambda = 0)
        m.smear_lambda.fill_(1.0)
        m.smear_gate.weight.normal_()
    return m


def test_smear_gate_starts_closed(tiny_h):
    m = tg.GPT(dataclasses.replace(tiny_h, vocab_size=64))
    x = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.embed(x), m.tok_emb(x), rtol=0, atol=0)


def test_smear_gate_never_crosses_a_bos(tiny_h):
    """The previous document's last token must not reach the BOS that starts the next one."""
    m = _smear_model(tiny_h)
    x = torch.randint(4, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    x[0, 8] = tg.BOS_ID
    y = x.clone()
    y[0, 7] = (x[0, 7] + 5) % 60 + 4  # change the last token of the first document
    with torch.no_grad():
        ex, ey = m.embed(x), m.embed(y)
    torch.testing.assert_close(ex[0, 8], ey[0, 8], rtol=0, atol=0)  # the BOS embedding is untouched
    torch.testing.assert_close(ex[0, 8], m.tok_emb.weight[tg.BOS_ID], rtol=0, atol=0)
    assert (ex[0, 7] - ey[0, 7]).abs().max() > 0  # (the changed token itself)
    # and the mask is what stops it: a non-BOS token at 8 does read token 7
    x[0, 8] = y[0, 8] = 9
    with torch.no_grad():
        assert (m.embed(x)[0, 8] - m.embed(y)[0, 8]).abs().max() > 1e-4


def test_smear_gate_leak_is_caught_without_the_mask(tiny_h, monkeypatch):
    """A planted leak (the mask compares with a token id that never occurs) fails the BOS check."""
    m = _smear_model(tiny_h)
    x = torch.randint(4, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    x[0, 8] = tg.BOS_ID
    y = x.clone()
    y[0, 7] = (x[0, 7] + 5) % 60 + 4
    monkeypatch.setattr(tg, "BOS_ID", 63 + 1000)
    with torch.no_grad():
        assert (m.embed(x)[0, 8] - m.embed(y)[0, 8]).abs().max() > 1e-4


def test_sparse_attention_gate_halves_at_init_and_reads_the_window(tiny_h):
    h = dataclasses.replace(tiny_h, vocab_size=64)
    attn = tg.GPT(h).blocks[0].attn
    assert attn.attn_gate_w.shape == (h.num_heads, h.gate_window) and not attn.attn_gate_w.any()
    off = tg.CausalSelfAttention(dataclasses.replace(h, sparse_attn_gate_enabled=False), use_xsa=True)
    off.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "attn_gate_w"})
    with torch.no_grad():
        for lin in (attn.proj, off.proj):
            lin.weight.copy_(torch.eye(h.model_dim))
        x = torch.randn(1, 8, h.model_dim, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(attn(x), 0.5 * off(x))  # sigmoid(0) = 1/2 for every head
        attn.attn_gate_w.normal_()
        x2 = x.clone()
        x2[..., h.gate_window:] += 1.0  # dims outside the window change attention, not the gate
        g = torch.sigmoid(h.sparse_attn_gate_scale * F.linear(x[..., :h.gate_window], attn.attn_gate_w))
        y = attn(x).view(1, 8, h.num_heads, h.head_dim)
        ref = off(x).view(1, 8, h.num_heads, h.head_dim)
        torch.testing.assert_close(y, ref * g[..., None], rtol=1e-4, atol=1e-5)
        assert (attn(x2) - attn(x)).abs().max() > 0


def test_parallel_lanes_mean_and_start_layer(tiny_h):
    h = dataclasses.replace(tiny_h, vocab_size=64)
    m = randomized(h)
    assert m.parallel_start == 3 and m.parallel_post_lambdas.shape == (1, 2, 2)
    assert tg.GPT(dataclasses.replace(h, parallel_start_layer=0)).parallel_post_lambdas is None
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m.forward_logits(x)
        m.parallel_post_lambdas[0, 1, 1] += 1.0  # MLP output into lane 1 only: still changes the mean
        b = m.forward_logits(x)
    assert (a - b).abs().max() > 1e-4


def test_lane_update_formula(tiny_h):
    """The lane update written out: lane j <- resid[j]*lane j + post[attn, j]*attn + post[mlp, j]*mlp."""
    h = dataclasses.replace(tiny_h, vocab_size=64)
    blk = randomized(h).blocks[3]
    g = torch.Generator().manual_seed(2)
    l0, l1, x0 = (torch.randn(1, 8, h.model_dim, generator=g) for _ in range(3))
    resid, post = torch.tensor([1.1, 0.9]), torch.tensor([[1.0, 0.5], [0.25, 2.0]])
    with torch.no_grad():
        n0, n1 = blk.forward_lanes(l0, l1, x0, None, resid, post)
        mix = blk.resid_mix
        a = blk.attn_scale * blk.attn(tg.rms_norm(mix[0] * l0 + mix[1] * x0) * blk.ln_scale_factor, None)
        mm = blk.mlp_scale * blk.mlp(tg.rms_norm(l1) * blk.ln_scale_factor)
    torch.testing.assert_close(n0, 1.1 * l0 + 1.0 * a + 0.25 * mm)
    torch.testing.assert_close(n1, 0.9 * l1 + 0.5 * a + 2.0 * mm)
