"""QUANT: per-group clip sigmas, the GPTQ'd tied embedding (EMBED_BITS), LQER low-rank error correction.
Run: python3 -m pytest -q tests/test_quant_lqer.py"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg

from conftest import perturbed_tiny_model


@pytest.fixture(scope="module")
def tiny(dataset):
    """The perturbed TINY model, its Hessians (tok_emb's included) and its state dict."""
    h, rt, model = perturbed_tiny_model(dataset)
    hess = tg.collect_hessians(h, rt, model, tg.new_train_loader(h))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return h, rt, model, sd, hess


@pytest.fixture(scope="module")
def quantized(tiny):
    """Default pass (LQER on) and the same pass with LQER_ENABLED=0."""
    h, rt, model, sd, hess = tiny
    on = tg.quantize_state_dict(h, rt, sd, hess)
    off = tg.quantize_state_dict(dataclasses.replace(h, lqer_enabled=False), rt, sd, hess)
    return on, off


def coded(meta):
    return [n for n, i in meta.items() if "method" in i]


def rel_err(W, D) -> float:
    return ((W.float() - D).norm() / W.float().norm()).item()


def test_group_sigmas_reach_their_tensors(tiny):
    h, rt, model, sd, hess = tiny
    h2 = dataclasses.replace(h, mlp_clip_sigmas=10.0, attn_clip_sigmas=16.0, embed_clip_sigmas=24.0)
    tensors, meta = tg.quantize_state_dict(h2, rt, sd, hess)
    want = {"mlp": 10.0, "attn": 16.0, "embed": 24.0}
    seen = set()
    for n in coded(meta):
        g = tg.quant_category(n)
        seen.add(g)
        assert meta[n]["group"] == g and meta[n]["sigmas"] == want[g] and meta[n]["sigma_mult"] == 1.0, n
        cr = meta[n]["clip_range"]  # SDClip row scales follow the tensor's own group sigmas
        torch.testing.assert_close(tensors[n + ".scale"], (want[g] * sd[n].float().std(dim=1) / cr).half())
    assert seen == {"mlp", "attn", "embed"}
    _, m2 = tg.quantize_state_dict(h2, rt, sd, hess, mult=1.5)
    assert all(m2[n]["sigmas"] == 1.5 * want[tg.quant_category(n)] for n in coded(m2))


def test_embedding_hessian_is_the_head_input(tiny):
    # H(tok_emb) = mean over calibration batches of hidden^T hidden, hidden = forward_hidden(x)
    h, rt, model, sd, hess = tiny
    loader, per = tg.new_train_loader(h), h.train_batch_tokens // h.train_seq_len // 8
    H = torch.zeros(h.model_dim, h.model_dim)
    assert h.gptq_calibration_batches <= 8  # TINY: micro-batches of the loader's first batch
    windows = loader.next_windows()
    with torch.no_grad():
        for m in range(h.gptq_calibration_batches):
            x, _ = loader.micro_batch(windows, m, per, rt.device)
            hid = model.forward_hidden(x).reshape(-1, h.model_dim)
            H += hid.T @ hid
    torch.testing.assert_close(hess["tok_emb.weight"], H / h.gptq_calibration_batches, rtol=1e-4, atol=1e-3)


def test_embedding_gptq_codes_and_bits(tiny):
    h, rt, model, sd, hess = tiny
    for bits in (7, 5):
        tensors, meta = tg.quantize_state_dict(dataclasses.replace(h, embed_bits=bits), rt, sd, hess)
        cr = 2 ** (bits - 1) - 1
        assert meta["tok_emb.weight"]["type"] == f"int{bits}" and meta["tok_emb.weight"]["clip_range"] == cr
        q = tensors["tok_emb.weight.q"]
        assert q.dtype == torch.int8 and int(q.abs().max()) <= cr
        assert all(meta[n]["clip_range"] == 31 for n in coded(meta) if n != "tok_emb.weight")  # matrices stay int6
    pct, mp_ = tg.quantize_state_dict(dataclasses.replace(h, gptq_clip="percentile", embed_bits=5), rt, sd, hess)
    assert mp_["tok_emb.weight"] == {"type": "int8"}  # the percentile pipeline: int8 rows, EMBED_BITS unused
    q, s = tg.quantize_int8_rows(sd["tok_emb.weight"])
    assert torch.equal(pct["tok_emb.weight.q"], q) and torch.equal(pct["tok_emb.weight.scale"], s)


def test_embedding_gptq_beats_rtn_at_the_same_scales(tiny):
    # a small random tied-embedding problem: GPTQ under H = X^T X of correlated hidden states vs
    # round-to-nearest at the very same row scales, in Hessian-weighted error tr(E H E^T)
    h, rt = tiny[0], tiny[1]
    g = torch.Generator().manual_seed(7)
    W = torch.randn(512, 64, generator=g) * 0.05
    X = torch.randn(4096, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8)
    H = X.T @ X
    hq = dataclasses.replace(h, embed_bits=7, quant_min_numel=16, lqer_enabled=False)
    tensors, meta = tg.quantize_state_dict(hq, rt, {"tok_emb.weight": W}, {"tok_emb.weight": H})
    assert meta["tok_emb.weight"]["method"] == "gptq" and meta["tok_emb.weight"]["clip_range"] == 63
    q, s = tensors["tok_emb.weight.q"], tensors["tok_emb.weight.scale"]
    assert int(q.abs().max()) <= 63
    q_rtn = torch.clamp(torch.round(W / s.float()[:, None]), -63, 63)
    herr = lambda E: torch.trace(E @ H @ E.T).item()
    e_gptq, e_rtn = herr(W - tg.dequant_codes(q, s)), herr(W - tg.dequant_codes(q_rtn, s))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_lqer_factors_pack_and_reduce_the_error():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g) * 0.01 \
        + 0.002 * torch.randn(96, 128, generator=g)  # a low-rank error plus noise
    f = tg.lqer_factors(E, 4, 64)
    assert set(f) == set(tg.LQER_SUFFIXES)
    assert f["lqA"].shape == (96, 4) and f["lqB"].shape == (4, 128) and f["lqB_scale"].shape == (8,)
    assert f["lqA"].dtype == f["lqB"].dtype == torch.int8
    assert f["lqA_scale"].dtype == f["lqB_scale"].dtype == torch.float16
    assert -2 <= int(f["lqA"].min()) and int(f["lqA"].max()) <= 1
    assert -8 <= int(f["lqB"].min()) and int(f["lqB"].max()) <= 7
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A = U[:, :4] * S[:4]
    torch.testing.assert_close(f["lqA_scale"].float(), (A.abs().max() / 1.5).half().float().reshape(1))
    Bg = Vh[:4].reshape(-1, 64)
    torch.testing.assert_close(f["lqB_scale"].float(), (Bg.abs().amax(dim=1) / 7.5).half().float())
    delta = tg.lqer_delta(f, 64)
    assert (E - delta).norm() < 0.75 * E.norm()  # the 2-bit A (one scale) bounds the gain
    assert tg.lqer_factors(E, 4, 100) is None  # 4 * 128 elements do not split into groups of 100
    d2 = tg.lqer_delta(tg.lqer_factors(-E, 4, 64), 64)  # the SVD's signs do not matter
    assert (d2 + delta).norm() < 0.05 * delta.norm()


def test_lqer_picks_the_largest_errors_and_reduces_them(tiny, quantized):
    h, rt, model, sd, hess = tiny
    (t_on, m_on), (t_off, m_off) = quantized
    errs = {n: (sd[n].float() - tg.dequant_codes(t_off[n + ".q"], t_off[n + ".scale"])).norm().item()
            for n in coded(m_off)}
    top = sorted(errs, key=errs.get, reverse=True)[:h.lqer_top_k]
    chosen = [n for n in coded(m_on) if "lqer_rank" in m_on[n]]
    assert sorted(chosen) == sorted(top) and len(chosen) == h.lqer_top_k == 3
    deq_on = tg.dequantize_state_dict(t_on, m_on, model.state_dict())
    deq_off = tg.dequantize_state_dict(t_off, m_off, model.state_dict())
    for n in chosen:
        assert m_on[n]["lqer_rank"] == h.lqer_rank and m_on[n]["lqer_group"] == h.lqer_asym_group
        assert rel_err(sd[n], deq_on[n]) < 0.98 * rel_err(sd[n], deq_off[n]), n
        f = {k: t_on[f"{n}.{k}"] for k in tg.LQER_SUFFIXES}
        torch.testing.assert_close(deq_on[n], deq_off[n] + tg.lqer_delta(f, h.lqer_asym_group))
    for n in set(sd) - set(chosen):
        assert torch.equal(deq_on[n], deq_off[n]), n


def test_lqer_off_is_the_plain_path(tiny, quantized):
    h, rt, model, sd, hess = tiny
    (t_on, m_on), (t_off, m_off) = quantized
    assert not any(".lq" in k for k in t_off) and not any("lqer_rank" in i for i in m_off.values())
    for k, v in t_off.items():  # LQER adds tensors and meta keys, it never changes the codes
        assert torch.equal(v, t_on[k]), k
    for n in m_off:
        assert m_off[n] == {k: v for k, v in m_on[n].items() if k not in ("lqer_rank", "lqer_group")}
    deq = tg.dequantize_state_dict(t_off, m_off, model.state_dict())
    for n in coded(m_off):
        assert torch.equal(deq[n], t_off[n + ".q"].float() * t_off[n + ".scale"].float()[:, None])
    _, m0 = tg.quantize_state_dict(dataclasses.replace(h, lqer_top_k=0), rt, sd, hess)
    assert m0 == m_off


def test_lqer_skips_tensors_whose_b_does_not_group(tiny, tmp_path):
    h, rt, model, sd, hess = tiny
    log = tmp_path / "log.txt"
    tg.configure_logging(str(log), True)
    try:
        tensors, meta = tg.quantize_state_dict(dataclasses.replace(h, lqer_asym_group=512, lqer_top_k=30), rt,
                                               sd, hess)
    finally:
        tg.configure_logging(None, False)
    text = log.read_text()
    chosen = [n for n in meta if "lqer_rank" in meta[n]]
    skipped = [n for n in coded(meta) if n not in chosen]
    assert chosen and skipped  # B = 4 x cols: 4 * 256 elements split into groups of 512, 4 * 64 do not
    for n in chosen:
        assert sd[n].shape[1] == 256, n
    for n in skipped:
        assert f"lqer: skipped {n}: its B has {4 * sd[n].shape[1]} elements" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("GPTQ quantization:"))
    assert "lqer:rank:4 group:512 " in line and all(f" {n}:0." in line for n in chosen)


def test_lqer_round_trips_through_the_artifact(tiny, quantized):
    h, rt, model, sd, hess = tiny
    (tensors, meta), _ = quantized
    extra = {"shape": {k: getattr(h, k) for k in tg.SHAPE_FIELDS}, "recurrence_active": False}
    t2, m2, _ = tg.deserialize_artifact(tg.serialize_artifact(tensors, meta, extra))
    assert m2 == meta and set(t2) == set(tensors)
    ref = tg.dequantize_state_dict(tensors, meta, model.state_dict())
    got = tg.load_model_from_artifact(h, rt, tg.serialize_artifact(tensors, meta, extra), "a.ptz").state_dict()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_missing_or_misshapen_lqer_tensors_are_artifact_errors(tiny, quantized):
    h, rt, model, sd, hess = tiny
    (tensors, meta), _ = quantized
    n = next(n for n in meta if "lqer_rank" in meta[n])
    for k in tg.LQER_SUFFIXES:
        t = {key: v for key, v in tensors.items() if key != f"{n}.{k}"}
        with pytest.raises(tg.ArtifactError, match=f"no tensor {n}.{k}"):
            tg.dequantize_state_dict(t, meta, model.state_dict())
    t = dict(tensors)
    t[f"{n}.lqA"] = t[f"{n}.lqA"][:, :2].contiguous()
    with pytest.raises(tg.ArtifactError, match="LQER factors"):
        tg.dequantize_state_dict(t, meta, model.state_dict())
    m = {**meta, n: {**meta[n], "lqer_group": 7}}
    with pytest.raises(tg.ArtifactError, match="LQER factors"):
        tg.dequantize_state_dict(tensors, m, model.state_dict())
    extra = {"shape": {k: getattr(h, k) for k in tg.SHAPE_FIELDS}}
    blob = tg.serialize_artifact({k: v for k, v in tensors.items() if k != f"{n}.lqB"}, meta, extra)
    with pytest.raises(tg.ArtifactError, match="lqB"):
        tg.load_model_from_artifact(h, rt, blob, "a.ptz")


def test_the_size_fit_requantizes_with_lqer(tiny, tmp_path):
    h, rt, model, sd, hess = tiny
    q = tg.Quantizer(h, rt, sd, hess)
    first = q.quantize()
    natural = len(tg.serialize_artifact(*first, {}))
    h2 = dataclasses.replace(h, artifact_limit_bytes=natural - natural // 20)
    log = tmp_path / "log.txt"
    tg.configure_logging(str(log), True)
    try:
        extra = {}
        blob = tg.fit_artifact(h2, tg.Quantizer(h2, rt, sd, hess), first, 0, extra)
    finally:
        tg.configure_logging(None, False)
    assert len(blob) <= h2.artifact_limit_bytes
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("size_fit: over by")]
    pat = r"size_fit: over by \d+ bytes; re-quantizing with clip sigmas x(\S+) \(mlp (\S+) attn (\S+) embed (\S+)\)$"
    m = re.match(pat, lines[-1])  # the last re-quantization made the artifact
    assert m, lines
    mult, mlp, attn, embed = map(float, m.groups())
    assert mult > 1 and mlp == pytest.approx(h.mlp_clip_sigmas * mult, rel=1e-3)
    assert attn == pytest.approx(h.attn_clip_sigmas * mult, rel=1e-3)
    assert embed == pytest.approx(h.embed_clip_sigmas * mult, rel=1e-3)
    tensors, meta, _ = tg.deserialize_artifact(blob)
    mults = {i["sigma_mult"] for i in meta.values() if "method" in i}
    assert len(mults) == 1 and mults.pop() == pytest.approx(mult, rel=1e-3)
    chosen = [n for n in meta if "lqer_rank" in meta[n]]
    assert len(chosen) == h.lqer_top_k  # LQER recomputed for the re-quantized codes
    deq = tg.dequantize_state_dict(tensors, meta, model.state_dict())
    for n in chosen:
        plain = tg.dequant_codes(tensors[n + ".q"], tensors[n + ".scale"])
        assert rel_err(sd[n], deq[n]) < rel_err(sd[n], plain), n


def test_pruning_leaves_the_embedding_alone(quantized):
    (tensors, meta), _ = quantized
    t = {k: v.clone() for k, v in tensors.items()}
    assert not tg.prunable("tok_emb.weight", meta["tok_emb.weight"])
    assert all(tg.prunable(n, meta[n]) for n in coded(meta) if n != "tok_emb.weight")
    n = tg.prune_ones(t, meta, 10**9)
    assert n > 0 and torch.equal(t["tok_emb.weight.q"], tensors["tok_emb.weight.q"])
    assert all(torch.equal(t[k], tensors[k]) for k in t if ".lq" in k)


@pytest.mark.parametrize("name,value", [("MLP_CLIP_SIGMAS", "0.5"), ("ATTN_CLIP_SIGMAS", "2000"),
                                        ("EMBED_CLIP_SIGMAS", "0"), ("EMBED_BITS", "4"), ("EMBED_BITS", "9"),
                                        ("LQER_RANK", "0"), ("LQER_TOP_K", "-1"), ("LQER_ASYM_GROUP", "0")])
def test_quant_settings_are_validated(name, value):
    with pytest.raises(tg.ConfigError, match=f"^{name}="):
        tg.Hyperparameters.from_env({name: value})


def test_quant_settings_accept_their_bounds():
    h = tg.Hyperparameters.from_env({"MLP_CLIP_SIGMAS": "1", "ATTN_CLIP_SIGMAS": "1000", "EMBED_BITS": "5",
                                     "LQER_TOP_K": "0", "LQER_RANK": "1", "LQER_ASYM_GROUP": "1", "LQER_ENABLED": "0"})
    assert (h.mlp_clip_sigmas, h.attn_clip_sigmas, h.embed_bits, h.lqer_enabled) == (1.0, 1000.0, 5, False)
    w = tg.env_typo_warnings({"GPTQ_SIGMAS": "12"})
    assert len(w) == 1 and "GPTQ_SIGMAS is no longer a setting" in w[0] and "EMBED_CLIP_SIGMAS" in w[0]


def _two_rank_worker(rank: int, path: str, init: str) -> None:
    torch.set_num_threads(1)
    tg.configure_logging(None, False)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        h, sd, hess = torch.load(path + ".in", weights_only=False)
        rt = tg.Runtime(rank=rank, world_size=2, distributed=True)
        tensors, meta = tg.Quantizer(h, rt, sd, hess).quantize()
        torch.save((tensors, meta), f"{path}.out{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_the_tensors_of_one(tiny, quantized, tmp_path):
    # each rank quantizes its share (GPTQ and LQER) and broadcasts it: both ranks end with exactly
    # the single-process result
    h, rt, model, sd, hess = tiny
    path = str(tmp_path / "q")
    torch.save((h, sd, hess), path + ".in")
    mp.spawn(_two_rank_worker, args=(path, f"file://{tmp_path / 'rdv'}"), nprocs=2, join=True)
    (ref, ref_meta), _ = quantized
    assert any(".lq" in k for k in ref)
    for rank in range(2):
        tensors, meta = torch.load(f"{path}.out{rank}", weights_only=False)
        assert meta == ref_meta and set(tensors) == set(ref)
        for k in ref:
            assert torch.equal(tensors[k], ref[k]), (rank, k)
