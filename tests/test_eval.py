"""EVAL: window plan, bytes and BPB, sliding/sharded eval, ETLB. Run: python3 -m pytest -q tests/test_eval.py"""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- window plan


def scored_targets(total: int, seq_len: int, windows) -> list[int]:
    out = []
    for ws, s in windows:
        out.extend(range(ws + s, ws + min(seq_len, total - ws)))
    return out


COMBOS = [(total, L, stride) for total, L, stride in itertools.product(
    [1, 2, 5, 63, 64, 65, 127, 128, 129, 1000, 1023, 4097], [1, 8, 64, 128], [1, 3, 8, 32, 64, 128]) if stride <= L]


@pytest.mark.parametrize("total,seq_len,stride", COMBOS)
def test_plan_windows_scores_every_target_once(total, seq_len, stride):
    windows = tg.plan_windows(total, seq_len, stride)
    got = scored_targets(total, seq_len, windows)
    assert sorted(got) == list(range(total))  # each target exactly once
    assert got == sorted(got)  # in order
    assert windows[0] == (0, 0)
    for ws, s in windows[1:]:
        assert ws % stride == 0 and s == seq_len - stride  # later windows score only their last stride
        assert ws + s < total  # no window scores nothing


def test_plan_windows_examples():
    assert tg.plan_windows(10, 4, 2) == [(0, 0), (2, 2), (4, 2), (6, 2)]  # 6 scores targets 8, 9
    assert tg.plan_windows(3, 8, 4) == [(0, 0)]
    assert tg.plan_windows(16, 8, 8) == [(0, 0), (8, 0)]
    assert tg.plan_windows(17, 8, 8) == [(0, 0), (8, 0), (16, 0)]


# ----------------------------------------------------------------------------- bytes and BPB


class FakeSP:
    """A SentencePiece-like vocabulary: 0 <unk>, 1 <s>, 2 '▁the', 3 'ab', 4 <0xE2>, 5 '▁é', 6 unused, 7 '▁', 8 '日本'."""

    pieces = ["<unk>", "<s>", "▁the", "ab", "<0xE2>", "▁é", "<unused>", "▁", "日本"]

    def vocab_size(self):
        return len(self.pieces)

    def is_control(self, i):
        return i == 1

    def is_unknown(self, i):
        return i == 0

    def is_unused(self, i):
        return i == 6

    def is_byte(self, i):
        return i == 4

    def id_to_piece(self, i):
        return self.pieces[i]


@pytest.fixture(scope="module")
def fake_luts():
    return tg.build_byte_luts(FakeSP(), 12, CPU)  # vocab padded beyond the tokenizer: boundary ids


def test_build_byte_luts(fake_luts):
    assert fake_luts.base_bytes.tolist() == [0, 0, 3, 2, 1, 2, 0, 0, 6, 0, 0, 0]
    assert fake_luts.has_space.tolist() == [False, False, True, False, False, True, False, True, False] + [False] * 3
    assert fake_luts.is_boundary.tolist() == [True, True, False, False, False, False, True, False, False] + [True] * 3
    assert fake_luts.base_bytes.dtype == torch.int16


@pytest.mark.parametrize("prev,tgt,nbytes", [
    (1, 2, 3),  # '▁the' right after <s>: the leading space is not charged
    (3, 2, 4),  # '▁the' after text: ' the'
    (0, 5, 2),  # '▁é' after <unk>: 'é' only
    (6, 5, 2),  # after an unused id: also a boundary
    (2, 5, 3),  # ' é'
    (2, 4, 1),  # a byte-fallback piece is one byte
    (1, 4, 1),
    (3, 7, 1),  # a lone '▁' is a space
    (1, 7, 0),
    (2, 8, 6),  # two 3-byte characters
    (2, 1, 0),  # control tokens have no bytes
    (2, 3, 2),
])
def test_count_target_bytes_by_hand(fake_luts, prev, tgt, nbytes):
    out = tg.count_target_bytes(torch.tensor([prev]), torch.tensor([tgt]), fake_luts)
    assert out.dtype == torch.float64 and out.tolist() == [nbytes]


def test_bpb_meter_by_hand(fake_luts):
    prev = torch.tensor([1, 2, 3, 2, 1])
    tgt = torch.tensor([2, 3, 5, 4, 7])
    nbytes = 3 + 2 + 3 + 1 + 0
    nll = torch.tensor([0.5, 1.25, 2.0, 0.75, 3.0])
    meter = tg.BpbMeter(CPU)
    meter.add(nll[:2], prev[:2], tgt[:2], fake_luts)
    meter.add(nll[2:], prev[2:], tgt[2:], fake_luts)
    loss, bpb = meter.result(tg.Runtime.single())
    assert loss == pytest.approx(7.5 / 5, rel=1e-12)
    assert bpb == pytest.approx(7.5 / math.log(2) / nbytes, rel=1e-12)
    assert meter.local_bpb() == pytest.approx(bpb, rel=1e-12)
    assert math.isnan(tg.BpbMeter(CPU).result(tg.Runtime.single())[1])


def test_bpb_meter_tracks_targets(fake_luts):
    meter = tg.BpbMeter(CPU, track=6)
    meter.add(torch.tensor([1.0, 2.0]), torch.tensor([2, 2]), torch.tensor([3, 3]), fake_luts, torch.tensor([4, 1]))
    assert meter.token_count.tolist() == [0, 1, 0, 0, 1, 0]
    assert meter.token_nll[4].item() == 1.0 and meter.token_nll[1].item() == 2.0 and math.isnan(meter.token_nll[0])


def test_real_tokenizer_bytes_equal_decoded_text(tiny_h):
    """On the fixture tokenizer, the bytes charged to a document equal its decoded UTF-8 length."""
    sp = tg.load_tokenizer(tiny_h)
    luts = tg.build_byte_luts(sp, tiny_h.vocab_size, CPU)
    texts = ["Hello world", "  two  spaces and tabs\tand\nnewlines", "Café naïve 日本語 emoji 🙂 done",
             "digits 1234567 and symbols <>{}[]", "x"]
    for text in texts:
        ids = sp.encode(text)
        got = tg.count_target_bytes(torch.tensor([tg.BOS_ID] + ids[:-1]), torch.tensor(ids), luts).sum().item()
        assert got == len(sp.decode(ids).encode("utf-8")), text


def test_load_tokenizer_errors(tiny_h, tmp_path):
    with pytest.raises(tg.DataError, match="cached_challenge_fineweb"):
        tg.load_tokenizer(dataclasses.replace(tiny_h, data_dir=str(tmp_path)))
    tok = tmp_path / "tokenizers"
    tok.mkdir()
    other = 2 * tiny_h.vocab_size
    (tok / f"fineweb_{other}_bpe.model").write_bytes(open(tiny_h.tokenizer_path, "rb").read())
    with pytest.raises(tg.DataError, match="VOCAB_SIZE"):
        tg.load_tokenizer(dataclasses.replace(tiny_h, data_dir=str(tmp_path), vocab_size=other))
    (tok / "fineweb_77_bpe.model").write_bytes(b"not a model")
    with pytest.raises(tg.DataError, match="not a SentencePiece model"):
        tg.load_tokenizer(dataclasses.replace(tiny_h, data_dir=str(tmp_path), vocab_size=77))


# ----------------------------------------------------------------------------- model-based evaluation


@pytest.fixture(scope="module")
def setup(dataset):
    from conftest import TINY
    data_dir, vocab = dataset
    h = dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab)
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.recurrence_active = True
    model.eval()
    luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size, CPU)
    val = tg.load_validation_tokens(h)
    tg.configure_logging(None, False)
    return h, model, luts, val


def test_sliding_with_full_stride_equals_eval_val(setup):
    h, model, luts, val = setup
    h = dataclasses.replace(h, eval_stride=h.eval_seq_len)
    rt = tg.Runtime.single()
    l1, b1 = tg.eval_val(h, rt, model, val, luts)
    l2, b2 = tg.eval_sliding(h, rt, model, val, luts)
    assert l1 == pytest.approx(l2, rel=1e-5) and b1 == pytest.approx(b2, rel=1e-5)
    assert 0 < b1 < 20
    # a shorter stride gives every target more context: different (here, with a random model, just finite)
    l3, b3 = tg.eval_sliding(dataclasses.replace(h, eval_stride=32), rt, model, val[:2049], luts)
    assert math.isfinite(b3) and b3 != pytest.approx(b1, rel=1e-9)


@pytest.mark.parametrize("total,seq_len,stride,etlb", [
    (300, 64, 16, False), (300, 64, 16, True), (64, 64, 64, False), (50, 64, 8, False), (50, 64, 8, True),
    (257, 128, 128, False), (257, 128, 96, True), (200, 32, 7, False)])
def test_score_windows_scores_each_target_once(setup, total, seq_len, stride, etlb):
    h, model, luts, val = setup
    h = dataclasses.replace(h, eval_seq_len=seq_len, eval_stride=stride, eval_batch_seqs=5)
    rt = tg.Runtime.single()
    tokens = val[:total + 1]
    meter = tg.BpbMeter(CPU, track=total)
    windows = tg.plan_windows(total, seq_len, stride)
    record = []
    tg.score_windows(h, rt, model.forward_hidden, model.logits, tokens, windows, meter, luts,
                     tg.Etlb(h, rt) if etlb else None, record)
    assert meter.token_count.tolist() == [1] * total
    assert int(meter.stats[1]) == total
    assert torch.isfinite(meter.token_nll).all()
    assert [(w, w + s) for (w, s) in windows] == [(w, a) for w, a, _ in record]
    assert all(e <= total for _, _, e in record)


def test_sliding_nll_is_the_windows_prediction(setup):
    """Each tracked nll is the CE of the window that scores it (maps position j to target start+j)."""
    h, model, luts, val = setup
    total, L, stride = 400, 64, 16
    h = dataclasses.replace(h, eval_seq_len=L, eval_stride=stride, eval_batch_seqs=4)
    tokens = val[:total + 1]
    meter = tg.BpbMeter(CPU, track=total)
    windows = tg.plan_windows(total, L, stride)
    tg.score_windows(h, tg.Runtime.single(), model.forward_hidden, model.logits, tokens, windows, meter, luts)
    with torch.no_grad():
        for i in (0, 1, 47, 63, 64, 200, total - 1):
            ws, s = next((w, s) for w, s in windows if w + s <= i < w + min(L, total - w))
            logits = model.forward_logits(tokens[ws:ws + L][None])[0]
            ref = F.cross_entropy(logits[i - ws][None].float(), tokens[i + 1][None]).item()
            assert meter.token_nll[i].item() == pytest.approx(ref, rel=1e-4, abs=1e-5), i
    # and the bytes are those of the targets given their previous token
    ref_bytes = tg.count_target_bytes(tokens[:-1], tokens[1:], luts).sum().item()
    assert meter.stats[2].item() == ref_bytes


def test_sharded_eval_over_two_fake_ranks(setup):
    h, model, luts, val = setup
    h = dataclasses.replace(h, eval_stride=32)
    rt = tg.Runtime.single()
    tokens = val[:3001]
    one = tg.eval_sliding(h, rt, model, tokens, luts)
    windows = tg.plan_windows(tokens.numel() - 1, h.eval_seq_len, h.eval_stride)
    W = 2
    meter = tg.BpbMeter(CPU, track=tokens.numel() - 1)
    for r in range(W):  # the slices eval_sliding gives ranks 0 and 1
        mine = windows[len(windows) * r // W:len(windows) * (r + 1) // W]
        tg.score_windows(h, tg.Runtime(rank=r, world_size=W), model.forward_hidden, model.logits, tokens, mine,
                         meter, luts)
    assert meter.token_count.eq(1).all()
    two = meter.result(rt)
    assert two[0] == pytest.approx(one[0], rel=1e-9) and two[1] == pytest.approx(one[1], rel=1e-9)


def test_eval_sliding_restores_nothing_and_is_repeatable(setup):
    h, model, luts, val = setup
    rt = tg.Runtime.single()
    a = tg.eval_sliding(h, rt, model, val[:1025], luts)
    b = tg.eval_sliding(h, rt, model, val[:1025], luts)
    assert a == b
    c = tg.eval_sliding(h, rt, model, val[:1025], luts, use_etlb=True)
    assert c != a and all(math.isfinite(x) for x in c)


def test_etlb_fit_moves_bias_toward_target_histogram():
    h = dataclasses.replace(tg.Hyperparameters(), vocab_size=10, etlb_lr=0.5)
    e = tg.Etlb(h, tg.Runtime.single())
    e.clip = 0.3  # ETLB_CLIP is 3.0; a tight clip shows it is applied
    targets = torch.full((40,), 3)
    e.fit(torch.zeros(40, 10), targets)
    assert e.b[3] > 0 and (e.b[torch.arange(10) != 3] < 0).all()
    for _ in range(20):
        e.fit(torch.zeros(40, 10), targets)
    assert e.b.abs().max() <= 0.3 + 1e-7 and e.b[3] == pytest.approx(0.3)
