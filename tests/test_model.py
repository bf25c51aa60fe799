"""MODEL: size, causality, initial loss, forward vs logits, recurrence. Run: python3 -m pytest -q tests/test_model.py"""
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
    assert sum(p.numel() for p in default_meta_model.parameters()) == 34_401_371


def test_default_virtual_layers(default_meta_model):
    m = default_meta_model
    assert m.virtual_layers() == list(range(11))
    m.recurrence_active = True
    try:
        assert m.virtual_layers() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    finally:
        m.recurrence_active = False


def test_virtual_layers_without_recurrence_layers():
    m = tg.GPT(dataclasses.replace(TINY, vocab_size=64, recur_layers=""))
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
