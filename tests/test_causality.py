"""Causality harness for every eval mode (CPU, seconds).

Target index i is token i+1 predicted from tokens[:i+1]. For each mode (sliding, ETLB,
score-first TTT, TTT+ETLB, pre-quant TTT's own pass) the harness
  * scores a short validation stream with a tracking BpbMeter and checks that every target
    is scored exactly once (token_count == 1, no NaN, reported loss == mean of the tracked nll);
  * changes token p and checks that the nll of every earlier target (indices < p-1) is
    bitwise unchanged: CPU fp32 is deterministic, every op is row-independent, and every run
    starts from the same weights, so any difference at all is a dependence on token p;
  * has teeth: target p-1 always changes; ETLB's carried bias and TTT's adapted weights make
    targets far after p change, while plain sliding only changes [p-1, p+EVAL_SEQ_LEN);
    TTT really changes the weights and the later chunks' losses;
  * checks train-after-score twice: from the `trace` that score_first_adapt fills, and from an
    independent event log (meter.add calls vs. the sequences model.forward is trained on);
  * is shown to fail on deliberately leaky variants: an ETLB fitted on the positions it then
    scores, a TTT that trains on a chunk before scoring it, and non-causal attention.
Also: plan_windows/chunk_windows partition the targets.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

from conftest import with_documents

N_TARGETS = 1124  # 4 full 256-target TTT chunks + a partial 5th; not a multiple of EVAL_SEQ_LEN
CHUNK = 256
# token positions to change: inside window 0 / chunk 0; mid chunk 1; the chunk-1/2 boundary
# (token 512 is the label of target 511, chunk 1's last, and the first input of chunk 2); the end
POSITIONS = (100, 386, 512, N_TARGETS - 2)
MODES = ("sliding", "etlb", "ngram", "etlb_ngram", "ttt", "ttt_etlb", "ttt_etlb_ngram", "pre_quant_ttt")
TTT_MODES = ("ttt", "ttt_etlb", "ttt_etlb_ngram", "pre_quant_ttt")
CARRIED = ("etlb", "ngram", "etlb_ngram", "ttt_etlb", "ttt_etlb_ngram")  # state that outlives a window
LEAK_POSITIONS = (386, N_TARGETS - 2)  # cheaper set for the leaky variants: a trained chunk, the last chunk


@dataclasses.dataclass
class Setup:
    h: tg.Hyperparameters
    rt: tg.Runtime
    luts: tg.ByteLuts
    tokens: torch.Tensor
    state: dict[str, torch.Tensor]


@pytest.fixture
def setup(tiny_h, rt_cpu) -> Setup:
    tg.configure_logging(None, False)
    h = dataclasses.replace(tiny_h, ttt_chunk=CHUNK, pre_quant_ttt_chunk=CHUNK, ttt_epochs=2,
                            pre_quant_ttt_epochs=2, eval_batch_seqs=4, ttt_lr=0.05, pre_quant_ttt_lr=0.003)
    h.validate()
    assert (h.eval_seq_len, h.eval_stride, h.pre_quant_ttt_freeze) == (128, 32, 2)
    tokens = tg.load_validation_tokens(h)[:N_TARGETS + 1].clone()
    assert tokens.numel() == N_TARGETS + 1
    luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size, rt_cpu.device)
    # A random model whose attention/MLP outputs matter: the zero-initialised projections
    # (which would make the fresh model a context-free bigram model) get random weights.
    torch.manual_seed(1234)
    model = tg.build_model(h, rt_cpu)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "_zero_init", False):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
        if model.skip_gates is not None:
            model.skip_gates.normal_(0.0, 1.0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Setup(h, rt_cpu, luts, tokens, state)


def fresh_model(s: Setup) -> tg.GPT:
    """Identical weights every time (TTT mutates the model); recurrence on, as at eval."""
    model = tg.build_model(s.h, s.rt)
    model.load_state_dict(s.state)
    model.recurrence_active = True
    return model


def run_mode(s: Setup, mode: str, tokens: torch.Tensor, model: tg.GPT | None = None, trace=None,
             meter: tg.BpbMeter | None = None, h: tg.Hyperparameters | None = None) -> torch.Tensor:
    """Run one eval mode on `tokens`; assert exactly-once scoring; return per-target nll."""
    h = h or s.h
    model = model if model is not None else fresh_model(s)
    total = tokens.numel() - 1
    meter = meter if meter is not None else tg.BpbMeter(s.rt.device, track=total)
    etlb, ngram = "etlb" in mode, mode.endswith("ngram")
    if mode in ("sliding", "etlb", "ngram", "etlb_ngram"):
        loss, _ = tg.eval_sliding(h, s.rt, model, tokens, s.luts, use_etlb=etlb, meter=meter, use_ngram=ngram)
    elif mode in ("ttt", "ttt_etlb", "ttt_etlb_ngram"):
        loss, _ = tg.eval_ttt(h, s.rt, model, tokens, s.luts, use_etlb=etlb, trace=trace, meter=meter,
                              use_ngram=ngram)
    elif mode == "pre_quant_ttt":
        loss, _ = tg.pre_quant_ttt(h, s.rt, model, tokens, s.luts, trace=trace, meter=meter)
    else:
        raise ValueError(mode)
    assert_scored_once(meter, total)
    assert loss == pytest.approx(meter.token_nll.mean().item(), rel=1e-9), "reported loss != tracked nll"
    return meter.token_nll.clone()


def assert_scored_once(meter: tg.BpbMeter, total: int) -> None:
    counts = meter.token_count
    assert counts.numel() == total
    bad = (counts != 1).nonzero().flatten()
    assert bad.numel() == 0, f"targets not scored exactly once: {bad[:10].tolist()} counts {counts[bad[:10]].tolist()}"
    assert not torch.isnan(meter.token_nll).any()
    assert meter.stats[1].item() == total


# ============================================================================ the checker


class Violation(NamedTuple):
    position: int  # the changed token
    first_target: int  # first earlier target index whose nll changed
    n_targets: int  # how many earlier targets changed
    max_abs: float


def perturbed(tokens: torch.Tensor, p: int, vocab: int) -> torch.Tensor:
    """tokens with token p replaced by token p-1 (or by another id if they are equal).

    Copying token p-1, the label of target p-2, makes a look-ahead leak visible even when it is
    weak: e.g. a bias fitted on a histogram that includes token p raises exactly target p-2's
    probability, while a random new id may move earlier losses by less than float32's ulp.
    """
    t = tokens.clone()
    t[p] = tokens[p - 1] if tokens[p - 1] != tokens[p] else (tokens[p] + 1) % vocab
    assert t[p] != tokens[p]
    return t


def perturbation_runs(run_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, positions,
                      vocab: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """nll of the original stream and of the stream with token p changed, for each p."""
    return run_fn(tokens), {p: run_fn(perturbed(tokens, p, vocab)) for p in positions}


def causality_violations(run_fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, positions,
                         vocab: int, runs=None) -> list[Violation]:
    """Positions p whose change altered the nll of some target before p-1 (bitwise)."""
    base, changed = runs if runs is not None else perturbation_runs(run_fn, tokens, positions, vocab)
    out = []
    for p in positions:
        diff = (changed[p][:p - 1] != base[:p - 1]).nonzero().flatten()
        if diff.numel():
            out.append(Violation(p, int(diff[0]), int(diff.numel()),
                                 float((changed[p][:p - 1] - base[:p - 1]).abs().max())))
    return out


def without_ttt(mode: str) -> str:
    """The same scoring without adaptation of the weights: ttt -> sliding, ttt_etlb_ngram -> etlb_ngram."""
    return {"ttt": "sliding", "pre_quant_ttt": "sliding"}.get(mode, mode.removeprefix("ttt_"))


def mode_runner(s: Setup, mode: str, **kw) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda toks: run_mode(s, mode, toks, **kw)


# ============================================================================ windows


@pytest.mark.parametrize("total,L,stride", [(1124, 128, 32), (1024, 128, 128), (1000, 128, 48), (100, 128, 32),
                                            (128, 128, 32), (129, 128, 32), (97, 128, 32), (5000, 2048, 64),
                                            (777, 64, 7), (1, 128, 32)])
def test_plan_windows_partition_targets(total, L, stride):
    wins = tg.plan_windows(total, L, stride)
    assert wins and wins[0] == (0, 0)
    nxt = 0
    for ws, s in wins:
        e = min(L, total - ws)
        assert ws >= 0 and 0 <= s < e <= L, (ws, s, e)
        assert ws + s == nxt, f"gap or overlap at window {ws}: scores from {ws + s}, expected {nxt}"
        assert ws == 0 or s == L - stride  # every later window has a full EVAL_SEQ_LEN-STRIDE context
        nxt = ws + e
    assert nxt == total


@pytest.mark.parametrize("total,L,stride,chunk", [(1124, 128, 32, 256), (1000, 128, 48, 256), (1000, 128, 128, 128),
                                                  (4097, 128, 96, 1024), (300, 128, 32, 2048)])
def test_chunk_windows_group_by_first_scored_target(total, L, stride, chunk):
    wins = tg.plan_windows(total, L, stride)
    n_chunks = max(1, math.ceil(total / chunk))
    groups = tg.chunk_windows(wins, chunk, n_chunks)
    assert len(groups) == n_chunks
    assert [w for g in groups for w in g] == wins  # order kept, nothing lost or duplicated
    covered = torch.zeros(total, dtype=torch.int64)
    for c, g in enumerate(groups):
        for ws, s in g:
            assert c * chunk <= ws + s < (c + 1) * chunk
            covered[ws + s:ws + min(L, total - ws)] += 1
    assert bool((covered == 1).all())


# ============================================================================ exactly once


@pytest.mark.parametrize("mode", MODES)
def test_every_target_scored_exactly_once(setup, mode):
    trace = {} if mode in TTT_MODES else None
    run_mode(setup, mode, setup.tokens, trace=trace)  # asserts counts == 1, no NaN, loss == mean nll
    if trace is not None:  # the score trace covers each target once, chunk by chunk
        covered = torch.zeros(N_TARGETS, dtype=torch.int64)
        for c in range(math.ceil(N_TARGETS / CHUNK)):
            for ws, first, end in trace[("score", c)]:
                assert c * CHUNK <= first < (c + 1) * CHUNK and ws <= first < end <= ws + setup.h.eval_seq_len
                covered[first:end] += 1
        assert bool((covered == 1).all())


# ============================================================================ causality


@pytest.mark.parametrize("mode", MODES)
def test_changing_a_token_leaves_earlier_losses_unchanged(setup, mode):
    s, L = setup, setup.h.eval_seq_len
    runs = perturbation_runs(mode_runner(s, mode), s.tokens, POSITIONS, s.h.vocab_size)
    assert causality_violations(None, s.tokens, POSITIONS, s.h.vocab_size, runs=runs) == []
    base, changed = runs
    last_trained_token = (math.ceil(N_TARGETS / CHUNK) - 1) * CHUNK  # training after chunk n-2 reads up to here
    for p in POSITIONS:
        d = changed[p] != base
        assert d[p - 1], f"p={p}: the changed token's own target kept its nll (vacuous test)"
        assert d[p:p + L - 1].any(), f"p={p}: no later target in p's windows changed (context has no effect?)"
        carried = mode in CARRIED or (mode in TTT_MODES and p <= last_trained_token)
        if p + L < N_TARGETS:
            far = d[p + L:]  # target i sees tokens w..i with w > i-L: p+L-1 is the last that can see p
            if carried:  # ETLB's bias / TTT's weights carry the change beyond the window
                assert far.any(), f"{mode} p={p}: nothing beyond p's windows changed (ETLB/TTT had no effect?)"
            else:  # plain sliding (or TTT's untrained last chunk): only p's own windows can change
                assert not far.any(), f"{mode} p={p}: targets {far.nonzero().flatten()[:5] + p + L} changed"


@pytest.mark.parametrize("mode", TTT_MODES)
def test_ttt_adapts_weights_and_later_losses(setup, mode):
    s = setup
    model = fresh_model(s)
    ttt = run_mode(s, mode, s.tokens, model=model)
    ref = run_mode(s, without_ttt(mode), s.tokens)
    after = model.state_dict()
    moved = {k for k, v in s.state.items() if not torch.equal(v, after[k])}
    if mode == "pre_quant_ttt":
        f = s.h.pre_quant_ttt_freeze
        assert moved and all(k.startswith(tuple(f"blocks.{i}." for i in range(f, s.h.num_layers))) for k in moved)
        assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    else:
        assert {"tok_emb.weight", "blocks.0.attn.c_q.weight"} <= moved
    max_change = max((after[k] - s.state[k]).abs().max().item() for k in moved)
    assert max_change > 1e-4
    # chunk 0 is scored before any training: same nll as the plain pass (batching differs, so
    # allow float noise); every later chunk is scored with adapted weights.
    assert torch.allclose(ttt[:CHUNK], ref[:CHUNK], rtol=0, atol=1e-5)
    for c in range(1, math.ceil(N_TARGETS / CHUNK)):
        gap = (ttt[c * CHUNK:(c + 1) * CHUNK] - ref[c * CHUNK:(c + 1) * CHUNK]).abs().max().item()
        assert gap > 1e-3, f"chunk {c}: TTT nll equals the un-adapted nll (max diff {gap:.2e})"


# ============================================================================ train after score


def train_after_score_violations(trace: dict, n_chunks: int) -> list[tuple[int, int]]:
    """(chunk, target) pairs trained on after chunk `chunk` before having been scored.

    trace[("score", c)]: (window start, first scored target, end-exclusive target) per window;
    trace[("train", c)]: (start, first label token, end-exclusive token) per training sequence:
    it reads tokens [start, end), i.e. targets start .. end-2 (target i's label is token i+1).
    """
    scored: set[int] = set()
    bad = []
    for c in range(n_chunks):
        for _, first, end in trace.get(("score", c), []):
            scored.update(range(first, end))
        for st, first_label, end_tok in trace.get(("train", c), []):
            assert first_label == st + 1
            bad += [(c, t) for t in range(st, end_tok - 1) if t not in scored]
    if ("train", n_chunks - 1) in trace:
        bad.append((n_chunks - 1, -1))  # the last chunk must never be trained on
    return bad


class EventMeter(tg.BpbMeter):
    """A tracking meter that also logs ("score", target indices) in call order."""

    def __init__(self, device, track, events):
        super().__init__(device, track)
        self.events = events

    def add(self, nll, prev, tgt, luts, index=None):
        super().add(nll, prev, tgt, luts, index)
        self.events.append(("score", index.tolist()))


def log_training(model: tg.GPT, tokens: torch.Tensor, events: list) -> None:
    """Log ("train", target indices) for every training forward, located in the token stream."""
    orig = model.forward
    L = None

    def forward(ids, targets):
        nonlocal L
        if torch.is_grad_enabled():
            L = ids.size(1)
            rows = torch.cat([ids, targets[:, -1:]], dim=1)
            grams = tokens.unfold(0, L + 1, 1)  # grams[st] = tokens[st:st+L+1]
            tidx = []
            for i, r in enumerate(rows):
                st = (grams == r).all(dim=1).nonzero().flatten().tolist()
                assert len(st) == 1, "training sequence not found uniquely in the stream"
                assert torch.equal(targets[i], tokens[st[0] + 1:st[0] + L + 1])
                tidx += range(st[0], st[0] + L)
            events.append(("train", tidx))
        return orig(ids, targets)

    model.forward = forward


def event_violations(events: list) -> list[tuple[int, int]]:
    """(scored target, trained target) pairs where a target was scored after the weights had
    trained on it or on a later target (then its loss depends on tokens after it)."""
    max_trained, bad = -1, []
    for kind, idx in events:
        if kind == "train":
            max_trained = max(max_trained, max(idx))
        elif idx and min(idx) <= max_trained:
            bad.append((min(idx), max_trained))
    return bad


def run_with_events(s: Setup, mode: str, tokens: torch.Tensor, h: tg.Hyperparameters | None = None):
    events, trace = [], {}
    model = fresh_model(s)
    log_training(model, tokens, events)
    meter = EventMeter(s.rt.device, tokens.numel() - 1, events)
    run_mode(s, mode, tokens, model=model, trace=trace, meter=meter, h=h)
    return trace, events


@pytest.mark.parametrize("stride", [32, 48])  # 48 does not divide the chunk: windows straddle chunk ends
@pytest.mark.parametrize("mode", TTT_MODES)
def test_ttt_trains_only_on_already_scored_targets(setup, mode, stride):
    h = dataclasses.replace(setup.h, eval_stride=stride)
    trace, events = run_with_events(setup, mode, setup.tokens, h=h)
    n_chunks = math.ceil(N_TARGETS / CHUNK)
    assert all(trace.get(("train", c)) for c in range(n_chunks - 1)), "some chunk was not trained on (vacuous)"
    assert train_after_score_violations(trace, n_chunks) == []
    steps = [idx for k, idx in events if k == "train"]  # one forward per epoch: the chunk's sequences
    assert len(steps) == (n_chunks - 1) * 2 and all(len(t) == CHUNK for t in steps)  # epochs=2
    assert event_violations(events) == []
    scored = [i for k, idx in events if k == "score" for i in idx]
    assert sorted(scored) == list(range(N_TARGETS))


@pytest.mark.parametrize("mode", ["ttt", "ttt_etlb"])
def test_ttt_minibatches_stay_score_first(setup, mode):
    # TTT_BATCH_SEQS=1: each chunk's 2 sequences are 2 optimizer steps per epoch, still only after
    # the chunk is scored; the adapted weights differ from the one-step-per-epoch run.
    h = dataclasses.replace(setup.h, ttt_batch_seqs=1)
    trace, events = run_with_events(setup, mode, setup.tokens, h=h)
    n_chunks = math.ceil(N_TARGETS / CHUNK)
    assert train_after_score_violations(trace, n_chunks) == [] and event_violations(events) == []
    steps = [idx for k, idx in events if k == "train"]
    per_seq = CHUNK // setup.h.eval_seq_len
    assert len(steps) == (n_chunks - 1) * 2 * per_seq and all(len(t) == setup.h.eval_seq_len for t in steps)
    v = causality_violations(mode_runner(setup, mode, h=h), setup.tokens, LEAK_POSITIONS, setup.h.vocab_size)
    assert v == []
    one_step = run_mode(setup, mode, setup.tokens)
    assert not torch.equal(run_mode(setup, mode, setup.tokens, h=h), one_step)


def run_rank_chains(s: Setup, mode: str, tokens: torch.Tensor, h: tg.Hyperparameters, world: int = 2,
                    traces: list | None = None) -> torch.Tensor:
    """TTT_CHAINS=rank on `world` ranks, run rank by rank in one process (the chains never talk
    before the final sum); asserts the union scores every target exactly once; returns its nll."""
    total = tokens.numel() - 1
    counts = torch.zeros(total, dtype=torch.long)
    nll = torch.zeros(total, dtype=torch.float64)
    for r in range(world):
        rt = tg.Runtime(rank=r, world_size=world, device=s.rt.device, distributed=False)
        meter, trace = tg.BpbMeter(rt.device, track=total), {}
        tg.eval_ttt(h, rt, fresh_model(s), tokens, s.luts, use_etlb="etlb" in mode, trace=trace, meter=meter,
                    use_ngram=mode.endswith("ngram"))
        if traces is not None:
            traces.append(trace)
        counts += meter.token_count
        nll += torch.where(meter.token_count > 0, meter.token_nll, 0.0)  # unscored targets hold NaN
    assert (counts == 1).all()
    return nll


@pytest.mark.parametrize("mode", ["ttt", "ttt_etlb", "ttt_etlb_ngram"])
def test_per_rank_chains_cover_every_target_once_and_restart(setup, mode):
    # TTT_CHAINS=rank with 2 ranks: rank r scores and trains only its contiguous chunks, the union
    # scores every target once, and rank 1's first chunk is scored by the un-adapted artifact
    # (its chain starts afresh).
    s = setup
    h = dataclasses.replace(s.h, ttt_chains="rank", ttt_batch_seqs=1)
    n_chunks = math.ceil(N_TARGETS / CHUNK)
    traces = []
    nll = run_rank_chains(s, mode, s.tokens, h, traces=traces)
    for r, trace in enumerate(traces):
        mine = list(range(n_chunks))[n_chunks * r // 2:n_chunks * (r + 1) // 2]
        assert {c for k, c in trace if k == "score"} == set(mine)
        assert {c for k, c in trace if k == "train" and trace[k, c]} == set(mine[:-1])  # not its last chunk
        assert train_after_score_violations(trace, n_chunks) == []
    ref = run_mode(s, without_ttt(mode), s.tokens)
    first1 = n_chunks // 2 * CHUNK  # rank 1's first chunk
    if mode == "ttt":  # (ETLB's bias chain also restarts, but its first window differs from sliding's)
        assert torch.allclose(nll[first1:first1 + CHUNK], ref[first1:first1 + CHUNK], rtol=0, atol=1e-5)
    assert not torch.allclose(nll[CHUNK:first1], ref[CHUNK:first1], rtol=0, atol=1e-3)  # rank 0 adapted


# ============================================================================ leaky variants


@torch.no_grad()
def leaky_score_windows(h, rt, hidden_fn, head_fn, tokens, windows, meter, luts, etlb=None, record=None,
                        tilt=None):
    """score_windows, one window at a time, except that ETLB's bias is fitted on the very
    positions [s, e) it then scores (instead of the context [0, s)). Without ETLB it is legal."""
    assert tilt is None
    L, total = h.eval_seq_len, tokens.numel() - 1
    for w, s in windows:
        e = min(L, total - w)
        x, y = tokens[w:w + e], tokens[w + 1:w + e + 1]
        logits = head_fn(hidden_fn(x[None]))[0].float()
        if record is not None:
            record.append((w, w + s, w + e))
        if etlb is not None:
            etlb.fit(logits[s:e], y[s:e])  # LEAK: fitted on the targets about to be scored
            logits = logits + etlb.b
        nll = F.cross_entropy(logits[s:e], y[s:e], reduction="none")
        meter.add(nll, x[s:e], y[s:e], luts, torch.arange(w + s, w + e, device=tokens.device))


@pytest.mark.parametrize("mode", ["etlb", "ttt_etlb"])
def test_harness_catches_etlb_fitted_on_scored_targets(setup, mode, monkeypatch):
    s = setup
    monkeypatch.setattr(tg, "score_windows", leaky_score_windows)
    # control: the reimplementation without ETLB passes (exactly once and causal) ...
    legal_twin = {"etlb": "sliding", "ttt_etlb": "ttt"}[mode]
    assert causality_violations(mode_runner(s, legal_twin), s.tokens, LEAK_POSITIONS, s.h.vocab_size) == []
    # ... and with the leaky ETLB every target is still scored exactly once, yet the harness flags it
    v = causality_violations(mode_runner(s, mode), s.tokens, LEAK_POSITIONS, s.h.vocab_size)
    assert [x.position for x in v] == [p for p in LEAK_POSITIONS if (p - 1) % s.h.eval_stride != 0]


_REAL_ADJUST = tg.NgramTilt.adjust


class UpdateFirstTilt(tg.NgramTilt):
    """LEAK: a batch's boosts come from statistics that already count the batch's own targets."""

    def adjust(self, nll, logq_hint, idx, tgt):
        probe = copy.copy(self)
        probe.stats = self.stats.clone()
        _REAL_ADJUST(probe, nll, logq_hint, idx, tgt)  # probe.stats: earlier batches + this one
        self.stats = probe.stats.clone()
        out = _REAL_ADJUST(self, nll, logq_hint, idx, tgt)  # scored with this batch already counted
        self.stats = probe.stats  # (each batch still counted once afterwards)
        return out


@pytest.mark.parametrize("mode", ["ngram", "ttt_etlb_ngram"])
def test_harness_catches_a_tilt_that_counts_a_batch_before_scoring_it(setup, mode, monkeypatch):
    s = setup
    assert causality_violations(mode_runner(s, mode), s.tokens, LEAK_POSITIONS, s.h.vocab_size) == []  # control
    monkeypatch.setattr(tg, "NgramTilt", UpdateFirstTilt)
    v = causality_violations(mode_runner(s, mode), s.tokens, LEAK_POSITIONS, s.h.vocab_size)
    # flagged where the changed target shares a cell with an earlier target of its own batch
    # (386: yes; for the stream's last target, whether it does depends on the data)
    assert LEAK_POSITIONS[0] in [x.position for x in v]


ORIG_CHUNK_WINDOWS = tg.chunk_windows


def shifted_chunk_windows(windows, chunk, n_chunks):
    """LEAK: chunk c's windows are scored one iteration late, i.e. after training on chunk c."""
    groups = ORIG_CHUNK_WINDOWS(windows, chunk, n_chunks)
    if n_chunks == 1:
        return groups
    return [[]] + groups[:n_chunks - 2] + [groups[n_chunks - 2] + groups[n_chunks - 1]]


@pytest.mark.parametrize("mode", TTT_MODES)
def test_harness_catches_training_before_scoring(setup, mode, monkeypatch):
    s = setup
    monkeypatch.setattr(tg, "chunk_windows", shifted_chunk_windows)
    # exactly-once still holds (run_mode asserts it), but all three checks flag the leak
    v = causality_violations(mode_runner(s, mode), s.tokens, LEAK_POSITIONS, s.h.vocab_size)
    # p in a trained chunk changes that chunk's earlier losses; the last chunk is never trained on
    assert [x.position for x in v] == [p for p in LEAK_POSITIONS if p <= 1024]
    trace, events = run_with_events(s, mode, s.tokens)
    assert train_after_score_violations(trace, math.ceil(N_TARGETS / CHUNK))
    assert event_violations(events)


def test_harness_catches_noncausal_attention(setup, monkeypatch):
    s = setup

    def bidirectional(q, k, v):
        rep = q.size(2) // k.size(2)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(tg, "attention", bidirectional)
    v = causality_violations(mode_runner(s, "sliding"), s.tokens, LEAK_POSITIONS, s.h.vocab_size)
    assert [x.position for x in v] == list(LEAK_POSITIONS)


# ============================================================================ per-document LoRA TTT
# The same stream with BOS written at LORA_BOS (plus its own at 0 and 523): 11 documents, one of a single
# target, most longer than the 64-token window. 6 prefix documents in 2 phases: phase 1 = documents 0-2
# (targets 0..199), phase 2 = documents 3-5 (200..469), then 5 suffix documents in batches [6, 7, 8], [9, 10].

LORA_BOS = (60, 61, 200, 330, 345, 470, 523, 700, 790, 1000)  # with the BOS at 0: 11 documents
# phase 1 (its SGD trains on it); phase 2 (likewise); document 7 (suffix, slot 1 of its batch); document 9's
# first chunk (it has 210 targets, so its adapter carries the change beyond the windows); the last target
LORA_POSITIONS = (100, 250, 600, 800, N_TARGETS - 2)
LORA_SAFE = LORA_POSITIONS + (540,)


@pytest.fixture
def lora_setup(setup) -> Setup:
    tokens = with_documents(setup.tokens, LORA_BOS)
    assert len(tg.find_documents(tokens)) == 11
    for p in LORA_SAFE:  # the perturbations leave the document boundaries alone
        assert tg.BOS_ID not in (tokens[p - 1], tokens[p], perturbed(tokens, p, setup.h.vocab_size)[p])
    h = dataclasses.replace(setup.h, ttt_lora_rank=4, ttt_lora_lr=0.003, ttt_chunk_size=32, ttt_batch_size=3,
                            phased_ttt_num_phases=2, phased_ttt_prefix_docs=6, global_ttt_lr=0.05, eval_seq_len=64)
    h.validate()
    return dataclasses.replace(setup, h=h, tokens=tokens)


def run_lora(s: Setup, tokens: torch.Tensor, ngram: bool = False, trace: list | None = None) -> torch.Tensor:
    """One LoRA TTT pass on `tokens`; asserts exactly-once scoring; returns per-target nll."""
    total = tokens.numel() - 1
    meter = tg.BpbMeter(s.rt.device, track=total)
    loss, _ = tg.eval_lora_ttt(s.h, s.rt, fresh_model(s), tokens, s.luts, use_ngram=ngram, trace=trace, meter=meter)
    assert_scored_once(meter, total)
    assert loss == pytest.approx(meter.token_nll.mean().item(), rel=1e-9)
    return meter.token_nll.clone()


def lora_event_violations(events: list) -> list[tuple[str, int]]:
    """(kind, target): an adapter step ("adapt") or the base's phase SGD ("global") that used a target
    not yet scored, or a target scored ("score") after the base had trained on it or on a later one."""
    scored, base_max, bad = set(), -1, []
    for kind, idx in events:
        if kind == "phase":  # a rank's phase boundary marker
            continue
        if kind == "score":
            bad += [("score", t) for t in idx if t <= base_max][:1]
            scored.update(idx)
        else:
            bad += [(kind, t) for t in idx if t not in scored][:1]
            if kind == "global" and idx:
                base_max = max(base_max, max(idx))
    return bad


@pytest.mark.parametrize("ngram", [False, True])
def test_lora_ttt_is_causal_and_carries_state(lora_setup, ngram):
    s = lora_setup
    # with the tilt, 540 (document 7's first chunk, while document 6 of its batch is still at its chunk 1)
    # checks that the tilt's boosts use whole earlier batches only
    positions = LORA_POSITIONS if not ngram else (250, 540, 800)
    runs = perturbation_runs(lambda t: run_lora(s, t, ngram), s.tokens, positions, s.h.vocab_size)
    assert causality_violations(None, s.tokens, positions, s.h.vocab_size, runs=runs) == []
    base, changed = runs
    d = {p: changed[p] != base for p in positions}
    assert all(d[p][p - 1] for p in positions)  # the changed token's own target (not vacuous)
    assert d[250][470:].float().mean() > 0.5  # the phase SGD carries the change to every later phase
    assert d[800][860:1000].any()  # the adapter carries it beyond the windows that hold token 800 (chunks 0, 1)
    if not ngram:  # slots are independent: the other documents of 600's batch, and the next batch's slot 0
        assert d[100][200:470].float().mean() > 0.5
        assert not d[600][700:1000].any() and d[600][600:700].any()
        assert not d[N_TARGETS - 2][:N_TARGETS - 3].any()


def test_lora_ttt_adapts_only_on_scored_targets(lora_setup):
    s = lora_setup
    events = []
    run_lora(s, s.tokens, ngram=True, trace=events)
    assert lora_event_violations(events) == []
    kinds = [k for k, _ in events]
    assert kinds.count("adapt") >= 10 and kinds.count("global") == 2  # not vacuous: one SGD step per phase
    assert sorted(t for k, idx in events if k == "score" for t in idx) == list(range(N_TARGETS))


class AdaptFirstLoraTTT(tg.LoraTTT):
    """LEAK: chunk c's Adam step comes before chunk c is scored."""

    def chunk_step(self, c, starts, lens, train):
        x, tidx, mask = self.chunk_inputs(c, starts, lens)
        if train is not None:
            nll, _ = self.forward(x, tidx)
            self.adapt(nll, tidx, mask & train[:, None])
        nll, logq = self.forward(x, tidx)
        self.record(nll, logq, tidx, mask)


def test_harness_catches_lora_adapting_before_scoring(lora_setup, monkeypatch):
    s = lora_setup
    monkeypatch.setattr(tg, "LoraTTT", AdaptFirstLoraTTT)
    v = causality_violations(lambda t: run_lora(s, t), s.tokens, (100, N_TARGETS - 2), s.h.vocab_size)
    # flagged where the chunk holding p is trained on, i.e. is not its document's last (1122's is)
    assert [x.position for x in v] == [100]
    events = []
    run_lora(s, s.tokens, trace=events)
    assert lora_event_violations(events)[0][0] == "adapt"


_REAL_GLOBAL_SGD = tg.global_sgd


def overreaching_global_sgd(h, rt, model, tokens, lo, hi, trace=None):
    """LEAK: a phase's SGD also trains on the next 100 targets, of documents not yet scored."""
    _REAL_GLOBAL_SGD(h, rt, model, tokens, lo, hi + 100, trace)


def test_harness_catches_a_phase_training_on_unscored_documents(lora_setup, monkeypatch):
    s = lora_setup
    monkeypatch.setattr(tg, "global_sgd", overreaching_global_sgd)
    v = causality_violations(lambda t: run_lora(s, t), s.tokens, (250, 600), s.h.vocab_size)
    # phase 1's SGD now reads targets 0..255: a change at 250 moves phase 2's scores of targets 200..248
    # (phase 2's now reads 200..519, so 600 is still only scored before any update that used it)
    assert [x.position for x in v] == [250]
    events = []
    run_lora(s, s.tokens, trace=events)
    assert lora_event_violations(events)[0] == ("global", 200)


def _lora_two_rank_worker(rank: int, path: str, init: str) -> None:
    torch.set_num_threads(1)
    tg.configure_logging(None, False)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        h, state, streams = torch.load(path + ".in", weights_only=False)
        rt = tg.Runtime(rank=rank, world_size=2, distributed=True)
        luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size, rt.device)
        out = []
        for toks in streams:
            model = tg.build_model(h, rt, init_weights=False)
            model.load_state_dict(state)
            model.recurrence_active = True
            meter, trace = tg.BpbMeter(rt.device, track=toks.numel() - 1), []
            result = tg.eval_lora_ttt(h, rt, model, toks, luts, use_ngram=True, trace=trace, meter=meter)
            out.append((result, meter.token_nll, meter.token_count, model.state_dict(), trace))
        torch.save(out, f"{path}.out{rank}")
    finally:
        torch.distributed.destroy_process_group()


def merge_rank_events(traces: list[list]) -> list:
    """The ranks' event logs as one: phase by phase (every rank's SGD steps after the previous phase,
    then every rank's scoring), which is the order the phase barrier enforces. A rank's log is cut at
    its ("phase", []) markers; a rank may have scored nothing in a phase."""
    def cut(t):
        parts = [[]]
        for e in t:
            parts.append([]) if e[0] == "phase" else parts[-1].append(e)
        return parts
    parts = [cut(t) for t in traces]
    assert len({len(p) for p in parts}) == 1  # every rank passed every phase boundary
    return [e for k in range(len(parts[0])) for first in (True, False) for p in parts for e in p[k]
            if (e[0] == "global") == first]


def test_lora_ttt_two_ranks_gloo(lora_setup, tmp_path):
    # 2 processes: each phase's documents split into contiguous rank ranges, the phase SGD's gradients
    # all-reduced, scores summed. Exactly once over the union, causal, both ranks end with one base.
    import torch.multiprocessing as mp
    s = lora_setup
    positions = (250,)
    streams = [s.tokens] + [perturbed(s.tokens, p, s.h.vocab_size) for p in positions]
    torch.save((s.h, fresh_model(s).state_dict(), streams), tmp_path / "run.in")
    mp.spawn(_lora_two_rank_worker, args=(str(tmp_path / "run"), f"file://{tmp_path / 'rdv'}"), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"run.out{r}", weights_only=False) for r in range(2)]
    union = []
    for i in range(len(streams)):
        (res0, nll0, cnt0, sd0, tr0), (res1, nll1, cnt1, sd1, tr1) = outs[0][i], outs[1][i]
        assert (cnt0 + cnt1).eq(1).all() and cnt0.any() and cnt1.any()
        nll = torch.where(cnt0 > 0, nll0, nll1)
        assert res0 == res1 and res0[0] == pytest.approx(nll.mean().item(), rel=1e-9)
        assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)  # the phase SGD kept the ranks' bases equal
        assert not torch.equal(sd0["tok_emb.weight"], s.state["tok_emb.weight"])
        assert lora_event_violations(merge_rank_events([tr0, tr1])) == []
        union.append(nll)
    changed = dict(zip(positions, union[1:]))
    assert causality_violations(None, s.tokens, positions, s.h.vocab_size, runs=(union[0], changed)) == []
    assert all(changed[p][p - 1] != union[0][p - 1] for p in positions)
    assert (changed[250][470:] != union[0][470:]).any()  # rank 0's phase-2 document moved the shared base
