"""OPTIM: routing, Newton-Schulz, LR/momentum schedules, Muon. Run: python3 -m pytest -q tests/test_optim.py"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train_gpt as tg

from conftest import TINY


def _check_routing(model: tg.GPT) -> dict:
    groups = tg.route_parameters(model)
    assert set(groups) == {"muon", "tok", "scalar"}
    routed = [p for g in groups.values() for _, p in g]
    all_params = list(model.parameters())
    assert len(routed) == len(all_params)
    assert {id(p) for p in routed} == {id(p) for p in all_params}  # each exactly once, by identity
    assert len({id(p) for p in routed}) == len(routed)
    names = {n for g in groups.values() for n, _ in g}
    assert names == {n for n, _ in model.named_parameters()}
    for _, p in groups["muon"]:
        assert p.ndim == 2
    ve = {"ve_shared.embed.weight"} if model.ve_layers else set()
    assert {n for n, _ in groups["tok"]} == {"tok_emb.weight"} | ve
    for n, p in groups["scalar"]:
        assert tg.is_control(n, p)
    return groups


def test_routing_default_model():
    with torch.device("meta"):  # shapes only (the CPU orthogonal init of 34M parameters is slow)
        m = tg.GPT(tg.Hyperparameters())
    groups = _check_routing(m)
    assert len(groups["muon"]) == 66  # 11 blocks x 6 matrices
    assert sum(p.numel() for _, p in groups["muon"]) + sum(p.numel() for _, p in groups["tok"]) \
        + sum(p.numel() for _, p in groups["scalar"]) == sum(p.numel() for p in m.parameters())
    scalar = {n for n, _ in groups["scalar"]}
    assert {"smear_gate.weight", "smear_lambda", "parallel_post_lambdas", "parallel_resid_lambdas",
            "blocks.0.attn.attn_gate_w"} <= scalar


def test_routing_tiny_model():
    m = tg.GPT(dataclasses.replace(TINY, vocab_size=128))
    groups = _check_routing(m)
    assert len(groups["muon"]) == 4 * 6 + 1
    # control tensors (q_gain, scales, skip weights/gates, resid_mix) are never given to Muon
    muon_names = [n for n, _ in groups["muon"]]
    for pat in tg.CONTROL_TENSOR_NAME_PATTERNS:
        assert not any(pat in n for n in muon_names)


def test_routing_without_value_embeddings():
    m = tg.GPT(dataclasses.replace(TINY, vocab_size=128, ve_layers=""))
    groups = _check_routing(m)
    assert len(groups["muon"]) == 24 and [n for n, _ in groups["tok"]] == ["tok_emb.weight"]


def _singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48), (3, 32, 64), (2, 96, 16)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    g = torch.Generator().manual_seed(sum(shape))
    G = torch.randn(*shape, generator=g)
    X = tg.zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    sv = _singular_values(X)
    assert sv.min() > 0.5 and sv.max() < 1.5, (sv.min(), sv.max())
    # and it is close to the polar factor U V^T, not just any well-conditioned matrix
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    cos = (X.float() * polar).sum(dim=(-2, -1)) / (X.float().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.95).all()


def test_newton_schulz_batch_matches_single():
    G = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0))
    Xb = tg.zeropower_via_newtonschulz5(G)
    for i in range(4):
        torch.testing.assert_close(Xb[i].float(), tg.zeropower_via_newtonschulz5(G[i]).float(), atol=2e-2, rtol=0)


def test_ttt_lr_cosine():
    h = tg.Hyperparameters(ttt_lr=0.01)
    n = 5
    lrs = [tg.ttt_lr_at(h, i, n) for i in range(n)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.0)
    assert lrs[2] == pytest.approx(0.005)  # half-way down the cosine
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert tg.ttt_lr_at(h, 0, 1) == pytest.approx(0.01)  # a one-chunk chain


def test_lr_scale_endpoints():
    h = dataclasses.replace(TINY, warmdown_frac=0.5)
    assert tg.lr_scale(0.0, h) == 1.0
    assert tg.lr_scale(0.49, h) == 1.0
    assert tg.lr_scale(0.5, h) == pytest.approx(1.0)
    assert tg.lr_scale(0.75, h) == pytest.approx(0.5)
    assert tg.lr_scale(1.0, dataclasses.replace(h, min_lr=0.0)) == pytest.approx(0.0)
    assert tg.lr_scale(1.0, h) == pytest.approx(h.min_lr) and tg.lr_scale(0.95, h) == pytest.approx(h.min_lr)
    assert tg.lr_scale(0.99, dataclasses.replace(h, warmdown_frac=0.0)) == 1.0
    d = tg.Hyperparameters()
    assert tg.lr_scale(1.0 - d.warmdown_frac - 1e-6, d) == 1.0
    assert tg.lr_scale(1.0, d) == pytest.approx(0.10)  # the MIN_LR floor
    vals = [tg.lr_scale(f / 100, d) for f in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone non-increasing


def test_muon_momentum_warmup_endpoints():
    h = dataclasses.replace(TINY, muon_momentum=0.99, muon_momentum_warmup_steps=100)
    assert tg.MUON_MOMENTUM_WARMUP_START == 0.92
    assert tg.muon_momentum_at(0, h) == pytest.approx(0.92)
    assert tg.muon_momentum_at(50, h) == pytest.approx(0.955)
    assert tg.muon_momentum_at(100, h) == pytest.approx(0.99)
    assert tg.muon_momentum_at(10_000, h) == pytest.approx(0.99)
    assert tg.muon_momentum_at(0, dataclasses.replace(h, muon_momentum_warmup_steps=0)) == pytest.approx(0.99)


def test_muon_reduces_least_squares_loss(rt_cpu):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(256, 32, generator=g)
    W_true = torch.randn(16, 32, generator=g) * 0.2
    B = A @ W_true.T
    W = torch.nn.Parameter(torch.zeros(16, 32))
    opt = tg.Muon([W], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, rt=rt_cpu)

    def loss_fn():
        return ((A @ W.T - B) ** 2).mean()

    losses = []
    for _ in range(30):
        loss = loss_fn()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = loss_fn().item()
    assert final < 0.2 * losses[0], losses
    assert "momentum_buffer" in opt.state[W]


def test_muon_weight_decay_shrinks_weights(rt_cpu):
    W = torch.nn.Parameter(torch.ones(8, 16))
    opt = tg.Muon([W], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5, rt=rt_cpu)
    W.grad = torch.zeros(8, 16)
    opt.step()  # zero gradient: only the decoupled decay acts, W *= 1 - lr*wd
    torch.testing.assert_close(W.detach(), torch.full((8, 16), 0.95))


def test_optimizers_schedule_sets_lr_and_momentum(rt_cpu):
    h = dataclasses.replace(TINY, vocab_size=128)
    m = tg.GPT(h)
    opts = tg.Optimizers(h, m, rt_cpu)
    opts.set_schedule(0.5, 0.93)
    assert opts.muon.param_groups[0]["lr"] == pytest.approx(0.5 * h.matrix_lr)
    assert opts.tok.param_groups[0]["lr"] == pytest.approx(0.5 * h.tied_embed_lr)
    assert opts.scalar.param_groups[0]["lr"] == pytest.approx(0.5 * h.scalar_lr)
    assert opts.muon.param_groups[0]["momentum"] == pytest.approx(0.93)
    assert opts.tok.param_groups[0]["weight_decay"] == h.embed_wd
    assert opts.muon.param_groups[0]["weight_decay"] == h.muon_wd
    n_opt = sum(len(g["params"]) for o in opts.all for g in o.param_groups)
    assert n_opt == len(list(m.parameters()))


