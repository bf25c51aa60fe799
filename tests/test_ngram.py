"""The prefix n-gram tilt (NGRAM_TILT): hints, normalization, online boosts, modes (CPU, seconds).

End-to-end causality and exactly-once scoring of the tilted eval modes are in
test_causality.py (modes ngram, etlb_ngram, ttt_etlb_ngram, and a leaky tilt it must catch).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import train_gpt as tg
from conftest import TINY


def reference_hints(tokens: list[int], orders: list[int], near: int) -> tuple[list[int], list[int]]:
    """The definition, by brute force: for target i (token i+1), the longest n in orders whose
    n-gram tokens[i-n+1..i] also ended at some t < i; hint = tokens[t+1] for the latest such t."""
    n_tgt = len(tokens) - 1
    hint, cell = [-1] * n_tgt, [-1] * n_tgt
    for i in range(n_tgt):
        for k, n in sorted(enumerate(orders), key=lambda kn: -kn[1]):
            if i - n + 1 < 0:
                continue
            gram = tokens[i - n + 1:i + 1]
            t = next((t for t in range(i - 1, n - 2, -1) if tokens[t - n + 1:t + 1] == gram), None)
            if t is not None:
                hint[i], cell[i] = tokens[t + 1], 2 * k + int(i - t > near)
                break
    return hint, cell


def repetitive_stream(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random tokens with copied spans, so that every order finds matches near and far."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n,), generator=g)
    for _ in range(n // 40):
        a, length = int(torch.randint(0, n - 30, (1,), generator=g)), int(torch.randint(3, 25, (1,), generator=g))
        b = int(torch.randint(0, n - length, (1,), generator=g))
        toks[b:b + length] = toks[a:a + length].clone()
    return toks


@pytest.mark.parametrize("vocab,orders,near", [(5, [1, 2, 3, 5], 10), (40, [1, 2, 3, 4, 6, 8], 30),
                                               (3, [2, 7, 16], 1), (50, [1], 1000)])
def test_hints_match_the_brute_force_definition(vocab, orders, near):
    toks = repetitive_stream(400, vocab, seed=vocab)
    hint, cell = tg.ngram_hints(toks, orders, near)
    ref_hint, ref_cell = reference_hints(toks.tolist(), orders, near)
    assert hint.tolist() == ref_hint
    assert cell.tolist() == ref_cell
    assert (hint >= 0).any() and (hint < 0).any() or orders == [1]


def test_hints_on_a_stream_shorter_than_the_orders():
    hint, cell = tg.ngram_hints(torch.tensor([3, 3, 3]), [1, 8], 10)
    assert hint.tolist() == [-1, 3] and cell.tolist() == [-1, 0]
    hint, cell = tg.ngram_hints(torch.tensor([7]), [1, 2], 10)
    assert hint.numel() == 0 and cell.numel() == 0


def prefix_violations(hints_fn, tokens: torch.Tensor, positions, vocab: int) -> list[int]:
    """Positions p whose change altered the hint or cell of a target before p (target i may read tokens[:i+1])."""
    base = hints_fn(tokens)
    bad = []
    for p in positions:
        t = tokens.clone()
        t[p] = (t[p] + 1) % vocab
        new = hints_fn(t)
        if any(not torch.equal(a[:p], b[:p]) for a, b in zip(base, new)):
            bad.append(p)
        assert any(not torch.equal(a[p:], b[p:]) for a, b in zip(base, new)), f"p={p}: no later hint changed"
    return bad


def test_hints_read_only_the_prefix_and_the_check_catches_a_leak():
    toks = repetitive_stream(600, 6)
    positions = (1, 57, 300, 598)
    honest = lambda t: tg.ngram_hints(t, [1, 2, 3, 4, 8], 50)  # noqa: E731
    assert prefix_violations(honest, toks, positions, 6) == []
    # LEAK: hints computed as if the stream were one token further along (each sees its own target)
    leaky = lambda t: tg.ngram_hints(torch.cat([t[1:], t[-1:]]), [1, 2, 3, 4, 8], 50)  # noqa: E731
    assert prefix_violations(leaky, toks, positions, 6) == [p for p in positions if p >= 2]


# ============================================================================ the tilt itself


def tilt_for(tokens: torch.Tensor, **over) -> tg.NgramTilt:
    h = dataclasses.replace(TINY, vocab_size=int(tokens.max()) + 1, **over)
    h.validate()
    return tg.NgramTilt(h, tg.Runtime.single("cpu"), tokens)


def warm_up(tilt: tg.NgramTilt, tokens: torch.Tensor, upto: int, vocab: int, seed: int = 0) -> None:
    """Feed the targets [0, upto) through adjust() in batches, with random model distributions."""
    g = torch.Generator().manual_seed(seed)
    for b0 in range(0, upto, 64):
        idx = torch.arange(b0, min(b0 + 64, upto))
        z = torch.randn(idx.numel(), vocab, generator=g, dtype=torch.float64) * 2
        nll, logq = tg._nll_and_hint_logq(z, tokens[idx + 1], tilt.hint[idx])
        tilt.adjust(nll, logq, idx, tokens[idx + 1])


def distribution_mass(tilt: tg.NgramTilt, i: int, vocab: int, seed: int = 1) -> tuple[float, float]:
    """Sum over every possible label y of exp(-nll'(y)) at target i, and max |nll' - nll|.

    All V candidate labels go through one adjust() call on a copy of the tilt, so they all see
    the same boost (fixed from earlier batches): this is the distribution position i is scored with."""
    z = torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    ys = torch.arange(vocab)
    zs = z.expand(vocab, vocab)
    nll, logq = tg._nll_and_hint_logq(zs, ys, tilt.hint[torch.full((vocab,), i)])
    out = copy.deepcopy(tilt).adjust(nll, logq, torch.full((vocab,), i), ys)
    return float(torch.exp(-out).sum()), float((out - nll).abs().max())


def test_tilted_distribution_sums_to_one_over_the_vocabulary():
    vocab = 12
    toks = repetitive_stream(3000, vocab)
    tilt = tilt_for(toks, ngram_bins=4, ngram_prior=2.0)
    warm_up(tilt, toks, 2500, vocab)
    checked = 0
    for i in range(2500, 2990, 7):
        if tilt.hint[i] < 0:
            continue
        mass, moved = distribution_mass(tilt, i, vocab)
        assert mass == pytest.approx(1.0, abs=1e-9), i
        assert moved > 1e-3, f"target {i}: the tilt changed nothing (boost 0?)"
        checked += 1
    assert checked > 30


class LabelHintTilt(tg.NgramTilt):
    """LEAK: where there is no hint, the target itself is used as the hint."""

    def adjust(self, nll, logq_hint, idx, tgt):
        saved = self.hint, self.cell
        none = saved[0][idx] < 0
        self.hint, self.cell = saved[0].clone(), saved[1].clone()
        self.hint[idx] = torch.where(none, tgt, saved[0][idx])
        self.cell[idx] = torch.where(none, 0, saved[1][idx])  # the first order's near cell
        logq_hint = torch.where(none, -nll, logq_hint)  # log q(hint) = log q(target) there
        try:
            return super().adjust(nll, logq_hint, idx, tgt)
        finally:
            self.hint, self.cell = saved


def test_mass_check_catches_a_hint_that_is_the_label():
    vocab = 12
    toks = repetitive_stream(3000, vocab)
    tilt = tilt_for(toks, ngram_orders="4", ngram_bins=1, ngram_prior=1.0)
    leaky = LabelHintTilt.__new__(LabelHintTilt)
    leaky.__dict__.update(copy.deepcopy(tilt.__dict__))
    warm_up(leaky, toks, 2500, vocab)
    i = next(i for i in range(2500, 3000) if tilt.hint[i] < 0)
    mass, _ = distribution_mass(leaky, i, vocab)
    assert abs(mass - 1.0) > 0.01  # every label got its own boost: not a distribution


def test_boosts_come_from_earlier_batches_only():
    vocab = 12
    toks = repetitive_stream(2000, vocab)
    tilt = tilt_for(toks)
    idx = torch.arange(100, 164)
    z = torch.randn(idx.numel(), vocab, dtype=torch.float64)
    nll, logq = tg._nll_and_hint_logq(z, toks[idx + 1], tilt.hint[idx])
    # a fresh tilt has no statistics: boost 0, the nll is unchanged ...
    assert torch.allclose(tilt.adjust(nll, logq, idx, toks[idx + 1]), nll, rtol=0, atol=1e-12)
    # ... and the batch it just scored is in the statistics afterwards
    assert tilt.stats[0].sum().item() == int((tilt.hint[idx] >= 0).sum())
    assert tilt.stats[1].sum().item() == int((tilt.hint[idx] == toks[idx + 1]).sum())


def test_boost_learns_a_reliable_hint():
    # a stream that repeats a 50-token block: after a few batches the hint is always right, and
    # the tilt's nll falls far below the model's (a uniform model here)
    vocab = 30
    block = torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(3))
    toks = block.repeat(40)
    tilt = tilt_for(toks)
    uniform = math.log(vocab)
    last = None
    for b0 in range(0, toks.numel() - 1, 100):
        idx = torch.arange(b0, min(b0 + 100, toks.numel() - 1))
        z = torch.zeros(idx.numel(), vocab, dtype=torch.float64)
        nll, logq = tg._nll_and_hint_logq(z, toks[idx + 1], tilt.hint[idx])
        assert torch.allclose(nll, torch.full_like(nll, uniform))
        last = tilt.adjust(nll, logq, idx, toks[idx + 1])
    assert last.mean().item() < 0.2 * uniform
    n, hits, _ = tilt.stats.sum(dim=1).tolist()
    assert n > 1900 and hits / n > 0.95
    assert tilt.scored == toks.numel() - 1
    assert tilt.summary() == f"ngram: hinted:{int(n)} hit_rate:{hits / n:.4f} hinted_frac:{n / tilt.scored:.4f}"


# ============================================================================ config and modes


def test_eval_modes_order_and_ablations():
    h = TINY
    assert tg.eval_modes(h) == [(True, True, True)]
    abl = tg.eval_modes(dataclasses.replace(h, eval_ablations=True))
    assert abl[-1] == (True, True, True) and len(abl) == 7 and len(set(abl)) == 7
    assert [m[0] for m in abl] == sorted(m[0] for m in abl)  # sliding passes before TTT passes
    no_ngram = dataclasses.replace(h, eval_ablations=True, ngram_tilt=False)
    assert tg.eval_modes(no_ngram) == [(False, True, False), (True, False, False), (True, True, False)]
    assert tg.eval_modes(dataclasses.replace(h, ttt_enabled=False, etlb_enabled=False, ngram_tilt=False)) == []
    assert tg.eval_modes(dataclasses.replace(h, ttt_enabled=False, etlb_enabled=False)) == [(False, False, True)]
    assert tg.mode_label(True, True, True) == "ttt_etlb_ngram"
    assert tg.mode_label(False, False, True) == "sliding_window_ngram"
    assert tg.mode_label(False, True, False) == "sliding_window_etlb"


@pytest.mark.parametrize("name,value,why", [("NGRAM_ORDERS", "0,2", "NGRAM_ORDERS"),
                                            ("NGRAM_ORDERS", "2,x", "NGRAM_ORDERS"),
                                            ("NGRAM_ORDERS", "", "NGRAM_ORDERS"),
                                            ("NGRAM_ORDERS", "300", "NGRAM_ORDERS"),
                                            ("NGRAM_BINS", "0", "NGRAM_BINS"),
                                            ("NGRAM_PRIOR", "-1", "NGRAM_PRIOR"),
                                            ("NGRAM_TILT", "2", "NGRAM_TILT")])
def test_bad_ngram_settings_name_the_variable(name, value, why):
    with pytest.raises(tg.ConfigError, match=why):
        tg.Hyperparameters.from_env({name: value})


def test_ngram_defaults():
    h = tg.Hyperparameters.from_env({})
    assert h.ngram_tilt and h.ngram_order_list == [1, 2, 3, 4, 5, 6, 8, 12, 16]
    assert (h.ngram_prior, h.ngram_bins, tg.NGRAM_MAX_BETA) == (5.0, 16, 6.0)
