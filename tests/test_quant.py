"""QUANT: GPTQ vs RTN, int5/int6, state-dict quantization, pruning. Run: python3 -m pytest -q tests/test_quant.py"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train_gpt as tg


@pytest.fixture(scope="module")
def correlated():
    """W (128x256, std 1 so that row scales sit above the 1/clip floor) and H = X^T X of correlated X."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 256, generator=g)
    A = torch.randn(256, 256, generator=g) / 16  # random mixing: strongly correlated input features
    X = torch.randn(2048, 256, generator=g) @ A
    return W, X, X.T @ X


CLIPS = ["sdclip", "percentile"]


@pytest.fixture(scope="module")
def gptq_codes(correlated):
    W, X, H = correlated
    return {(clip, cr): tg.gptq_quantize_weight(W, H, clip_range=cr, clip=clip, sigmas=12.85)
            for clip in CLIPS for cr in (31, 15)}


def out_err(W, q, s, X) -> float:
    return ((W - q.float() * s.float()[:, None]) @ X.T).norm().item()


def entropy_bits(q) -> float:
    p = torch.bincount(q.flatten().long() + 128).double()
    p = p[p > 0] / q.numel()
    return float(-(p * p.log2()).sum())


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("clip_range", [31, 15])
def test_gptq_beats_round_to_nearest_on_output_error(correlated, gptq_codes, clip, clip_range):
    W, X, H = correlated
    q, s = gptq_codes[clip, clip_range]
    assert q.dtype == torch.int8 and q.shape == W.shape
    assert s.dtype == torch.float16 and s.shape == (W.shape[0],)
    assert int(q.abs().max()) <= clip_range
    if clip == "percentile":
        assert int(q.abs().max()) == clip_range  # the range is used, not collapsed
        assert (s.float() >= 1.0 / clip_range - 1e-4).all()  # row scales are floored at 1/clip
    else:  # SDClip: scale = sigmas * std(row) / clip_range, no search, no floor
        torch.testing.assert_close(s, (12.85 * W.std(dim=1) / clip_range).half())
    # round-to-nearest at the very same scales
    q_rtn_same = torch.clamp(torch.round(W / s.float()[:, None]), -clip_range, clip_range)
    e_gptq, e_same = out_err(W, q, s, X), out_err(W, q_rtn_same, s, X)
    assert e_gptq < 0.85 * e_same, (e_gptq, e_same)
    # and the RTN fallback with the same scale rule
    q2, s2 = tg.quantize_rtn(W, clip_range, clip, 12.85)
    assert int(q2.abs().max()) <= clip_range and q2.dtype == torch.int8 and s2.dtype == torch.float16
    assert e_gptq < 0.85 * out_err(W, q2, s2, X)
    # sanity: the quantization is faithful. On Gaussian rows SDClip's 12.85-sigma range is coarser
    # than the percentile search (it is sized for heavy-tailed trained weights): about 0.41 sigma steps
    rel = e_gptq / (W @ X.T).norm().item()
    bound = {("percentile", 31): 0.05, ("percentile", 15): 0.1, ("sdclip", 31): 0.1, ("sdclip", 15): 0.2}
    assert rel < bound[clip, clip_range], rel


@pytest.mark.parametrize("clip", CLIPS)
def test_int5_is_coarser_than_int6(correlated, gptq_codes, clip):
    W, X, H = correlated
    assert out_err(W, *gptq_codes[clip, 31], X) < out_err(W, *gptq_codes[clip, 15], X)


def test_sdclip_is_scale_invariant_and_the_floor_is_not():
    # The record's 1/31 floor gives small-weight rows a coarse fixed step; SDClip scales with the row.
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 256, generator=g) * 0.02  # typical trained-weight magnitude: under the floor
    H = torch.eye(256)
    q_small, s_small = tg.gptq_quantize_weight(W, H, clip="sdclip")
    q_big, s_big = tg.gptq_quantize_weight(W * 64, H, clip="sdclip")  # a power of two: exact in fp16
    assert torch.equal(q_small, q_big)
    torch.testing.assert_close(s_big.float(), 64 * s_small.float())
    q_pct, s_pct = tg.gptq_quantize_weight(W, H, clip="percentile")
    assert (s_pct.float() == s_pct.float()[0]).all() and abs(float(s_pct[0]) - 1 / 31) < 1e-4  # all on the floor
    err = lambda q, s: (W - q.float() * s.float()[:, None]).pow(2).mean()
    assert err(q_small, s_small) < 0.5 * err(q_pct, s_pct)  # finer where it matters
    assert entropy_bits(q_small) > entropy_bits(q_pct)  # ... and it costs bits


def test_sdclip_sigmas_trade_size_for_error(correlated):
    # Bits per code fall by about log2 of the sigma ratio: the knob SIZE_FIT=auto turns.
    W, X, H = correlated
    res = {k: tg.gptq_quantize_weight(W, H, clip="sdclip", sigmas=k) for k in (8.0, 16.0, 32.0)}
    bits = {k: entropy_bits(q) for k, (q, _) in res.items()}
    errs = {k: out_err(W, q, s, X) for k, (q, s) in res.items()}
    assert bits[8.0] > bits[16.0] > bits[32.0]
    assert errs[8.0] < errs[16.0] < errs[32.0]
    assert 0.8 < bits[8.0] - bits[16.0] < 1.2 and 0.8 < bits[16.0] - bits[32.0] < 1.2


def test_gptq_handles_dead_columns_and_is_deterministic(correlated):
    W, X, H = correlated
    W, H = W[:32, :128], H[:128, :128].clone()
    H[:, 7] = 0
    H[7, :] = 0  # an input feature that never fires
    q, s = tg.gptq_quantize_weight(W, H)
    assert torch.isfinite(s.float()).all() and int(q.abs().max()) <= 31
    assert not q[:, 7].any()  # its weights do not matter and are zeroed
    q2, s2 = tg.gptq_quantize_weight(W, H)
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_gptq_identity_hessian_is_rtn_like():
    # With H = I there is no correlation to exploit: GPTQ's error is about RTN's.
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 128, generator=g)
    q, s = tg.gptq_quantize_weight(W, torch.eye(128))
    q_rtn = torch.clamp(torch.round(W / s.float()[:, None]), -31, 31)
    torch.testing.assert_close(q.float(), q_rtn)


def test_quantize_rtn_zero_matrix():
    q, s = tg.quantize_rtn(torch.zeros(4, 8), 31, "percentile")
    assert not q.any() and torch.allclose(s.float(), torch.full((4,), 1 / 31), atol=1e-4)
    q, s = tg.quantize_rtn(torch.zeros(4, 8), 31, "sdclip")
    assert not q.any() and (s.float() > 0).all() and torch.isfinite(s.float()).all()


def test_int8_rows_round_trip():
    t = torch.randn(32, 100, generator=torch.Generator().manual_seed(2))
    q, s = tg.quantize_int8_rows(t)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and int(q.abs().max()) <= 127
    err = (q.float() * s.float()[:, None] - t).abs().max()
    assert err < 0.05


@pytest.fixture(scope="module")
def tiny_quant(dataset):
    """A TINY model with random (non-zero) projections, its Hessians and its quantized state dict."""
    from conftest import perturbed_tiny_model
    h, rt, model = perturbed_tiny_model(dataset)
    hess = tg.collect_hessians(h, rt, model, tg.new_train_loader(h))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors, meta = tg.quantize_state_dict(h, rt, sd, hess)
    return h, rt, model, sd, hess, tensors, meta


def test_collect_hessians(tiny_quant):
    h, rt, model, sd, hess, _, _ = tiny_quant
    names = set(tg.hessian_targets(model, h.quant_min_numel))
    assert set(hess) == names | {"tok_emb.weight"} and len(names) == 6 * h.num_layers
    for n, H in hess.items():
        cols = sd[n].shape[1]
        assert H.shape == (cols, cols) and H.dtype == torch.float32
        torch.testing.assert_close(H, H.T)
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-6 * H.diagonal().max()  # PSD
        assert H.diagonal().sum() > 0


def test_quantize_state_dict_gptq_everywhere(tiny_quant):
    h, rt, model, sd, hess, tensors, meta = tiny_quant
    block_mats = [n for n, t in sd.items() if n.startswith("blocks.") and n.endswith(".weight") and t.ndim == 2]
    assert len(block_mats) == 6 * h.num_layers
    for n in block_mats:
        assert meta[n]["method"] == "gptq", n
        assert meta[n]["type"] == "int6" and meta[n]["clip_range"] == 31
        assert meta[n]["clip"] == "sdclip" and meta[n]["sigma_mult"] == 1.0
        assert meta[n]["sigmas"] == (h.mlp_clip_sigmas if ".mlp." in n else h.attn_clip_sigmas)
        q, s = tensors[n + ".q"], tensors[n + ".scale"]
        assert q.dtype == torch.int8 and q.shape == sd[n].shape and int(q.abs().max()) <= 31
        assert s.dtype == torch.float16 and s.shape == (sd[n].shape[0],)
        assert n not in tensors
    emb = meta["tok_emb.weight"]  # GPTQ'd at EMBED_BITS under the head-input Hessian
    assert emb == {"type": f"int{h.embed_bits}", "method": "gptq", "clip_range": 2 ** (h.embed_bits - 1) - 1,
                   "clip": "sdclip", "group": "embed", "sigmas": h.embed_clip_sigmas, "sigma_mult": 1.0,
                   **({k: emb[k] for k in ("lqer_rank", "lqer_group") if k in emb})}
    assert set(meta) == set(sd)  # every tensor has exactly one entry
    for n, info in meta.items():
        if info["type"] == "passthrough":
            assert tensors[n].dtype == torch.float16
            assert sd[n].numel() <= h.quant_min_numel or sd[n].ndim != 2, n


def test_dequantize_state_dict_close_to_original(tiny_quant):
    h, rt, model, sd, hess, tensors, meta = tiny_quant
    deq = tg.dequantize_state_dict(tensors, meta, model.state_dict())
    assert set(deq) == set(sd)
    for n, t in deq.items():
        assert t.shape == sd[n].shape and t.dtype == sd[n].dtype, n
        rel = ((t - sd[n]).norm() / sd[n].norm().clamp_min(1e-12)).item()
        bound = {"int5": 0.8, "int6": 0.4, "int7": 0.2, "int8": 0.1, "passthrough": 2e-3}[meta[n]["type"]]
        assert rel < bound, (n, meta[n], rel)
    # the dequantized model loads and is close to the original in function
    m2 = tg.build_model(h, rt)
    m2.load_state_dict(deq)
    x = torch.randint(0, h.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model.forward_logits(x), m2.forward_logits(x)
    assert (a - b).abs().mean() < 0.2 * a.abs().mean()


def test_dequantize_rejects_a_different_model(tiny_quant):
    h, rt, model, sd, hess, tensors, meta = tiny_quant
    other = tg.GPT(dataclasses.replace(h, num_layers=5, parallel_start_layer=4)).state_dict()
    with pytest.raises(tg.ArtifactError, match="blocks.4"):
        tg.dequantize_state_dict(tensors, meta, other)
    other = tg.GPT(dataclasses.replace(h, mlp_mult=2.0)).state_dict()
    with pytest.raises(tg.ArtifactError, match="shape"):
        tg.dequantize_state_dict(tensors, meta, other)


def test_sigmas_override_coarsens_every_matrix(tiny_quant):
    # the SIZE_FIT=auto path: re-quantizing at larger sigmas gives fewer bits on every matrix
    h, rt, model, sd, hess, tensors, meta = tiny_quant
    t2, m2 = tg.quantize_state_dict(h, rt, sd, hess, mult=2.0)
    mats = [n for n in meta if "method" in meta[n]]
    assert len(mats) == 6 * h.num_layers + 1  # the embedding too
    assert all(m2[n]["sigmas"] == 2 * meta[n]["sigmas"] and m2[n]["sigma_mult"] == 2.0 for n in mats)
    for n in mats:
        assert entropy_bits(t2[n + ".q"]) < entropy_bits(tensors[n + ".q"]), n
    pct, mp = tg.quantize_state_dict(dataclasses.replace(h, gptq_clip="percentile"), rt, sd, hess)
    assert mp["tok_emb.weight"] == {"type": "int8"}  # the percentile pipeline keeps int8 rows for it
    assert all(mp[n]["clip"] == "percentile" and "sigmas" not in mp[n] for n in mats if n != "tok_emb.weight")


def test_no_hessian_falls_back_to_clip_search(tiny_quant):
    h, rt, model, sd, hess, _, _ = tiny_quant
    _, meta = tg.quantize_state_dict(h, rt, sd, {})
    methods = {meta[n]["method"] for n in meta if "method" in meta[n]}
    assert methods == {"clip_search"}


def _prune_case():
    g = torch.Generator().manual_seed(5)
    tensors, meta = {}, {}
    for name, rows, lo in (("a", 6, 0.1), ("b", 4, 0.05)):
        q = torch.randint(-3, 4, (rows, 20), generator=g, dtype=torch.int64).to(torch.int8)
        s = (lo + torch.rand(rows, generator=g)).half()
        tensors[name + ".q"], tensors[name + ".scale"] = q, s
        meta[name] = {"type": "int6", "method": "gptq"}
    tensors["c"] = torch.randn(3, 3).half()
    meta["c"] = {"type": "passthrough"}
    return tensors, meta


def _ones(tensors, meta):
    out = []
    for n, info in meta.items():
        if tg.prunable(n, info):
            r, c = torch.nonzero(tensors[n + ".q"].abs() == 1, as_tuple=True)
            out += [(float(tensors[n + ".scale"][i]), n, int(i), int(j)) for i, j in zip(r, c)]
    return out


@pytest.mark.parametrize("count", [1, 7, 25])
def test_prune_ones_zeroes_the_cheapest(count):
    tensors, meta = _prune_case()
    before = {k: v.clone() for k, v in tensors.items()}
    ones = _ones(tensors, meta)
    assert len(ones) > count
    assert tg.prune_ones(tensors, meta, count) == count
    after_ones = _ones(tensors, meta)
    assert len(after_ones) == len(ones) - count
    zeroed = set((n, i, j) for _, n, i, j in ones) - set((n, i, j) for _, n, i, j in after_ones)
    assert len(zeroed) == count
    for _, n, i, j in ones:
        if (n, i, j) in zeroed:
            assert tensors[n + ".q"][i, j] == 0
    # only +-1 codes changed, nothing else
    for n in ("a", "b"):
        changed = tensors[n + ".q"] != before[n + ".q"]
        assert (before[n + ".q"][changed].abs() == 1).all()
        assert torch.equal(tensors[n + ".scale"], before[n + ".scale"])
    assert torch.equal(tensors["c"], before["c"])
    # the zeroed ones have the smallest row scales
    pruned_scales = [s for s, n, i, j in ones if (n, i, j) in zeroed]
    kept_scales = [s for s, *_ in after_ones]
    assert max(pruned_scales) <= min(kept_scales)


def test_prune_ones_more_than_available():
    tensors, meta = _prune_case()
    n = len(_ones(tensors, meta))
    assert tg.prune_ones(tensors, meta, n + 100) == n
    assert _ones(tensors, meta) == []
    assert tg.prune_ones(tensors, meta, 5) == 0
    assert tg.prune_ones(*_prune_case(), 0) == 0
