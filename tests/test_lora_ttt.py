"""ADAPTATION: per-document LoRA TTT with phased global SGD (eval_lora_ttt). CPU, seconds.

Its causality (score before update, with planted leaks; 1 and 2 ranks) is in test_causality.py.
Run: python3 -m pytest -q tests/test_lora_ttt.py
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

from conftest import perturbed_tiny_model, with_documents

N_TOKENS = 1125
EXTRA_BOS = (60, 61, 200, 330, 345, 470, 523, 700, 790, 1000)  # with the BOS at 0: 11 documents


@pytest.fixture(scope="module")
def lora(dataset):
    """(h, rt, model state, tokens, luts): the tiny model with recurrence on, a 1124-target stream of 11
    documents (one of a single target, most longer than the 64-token window), small adapters."""
    h, rt, model = perturbed_tiny_model(dataset)
    h = dataclasses.replace(h, ttt_lora_rank=4, ttt_chunk_size=32, ttt_batch_size=3, ttt_lora_lr=0.003,
                            phased_ttt_num_phases=0, global_ttt_lr=0.05, phased_ttt_prefix_docs=6, eval_seq_len=64)
    h.validate()
    tokens = with_documents(tg.load_validation_tokens(h)[:N_TOKENS], EXTRA_BOS)
    luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size, rt.device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return h, rt, state, tokens, luts


def fresh(h, rt, state) -> tg.GPT:
    model = tg.build_model(h, rt, init_weights=False)
    model.load_state_dict(state)
    model.recurrence_active = True
    return model


def run(lora, h=None, tokens=None, model=None, ngram=False, trace=None):
    """One pass; asserts every target is scored exactly once with the stream's bytes; returns (meter, model)."""
    h0, rt, state, toks, luts = lora
    h, tokens = h or h0, toks if tokens is None else tokens
    model = model or fresh(h, rt, state)
    total = tokens.numel() - 1
    meter = tg.BpbMeter(rt.device, track=total)
    loss, bpb = tg.eval_lora_ttt(h, rt, model, tokens, luts, use_ngram=ngram, trace=trace, meter=meter)
    assert meter.token_count.tolist() == [1] * total
    assert meter.stats[1].item() == total
    assert meter.stats[2].item() == tg.count_target_bytes(tokens[:-1], tokens[1:], luts).sum().item()
    assert loss == pytest.approx(meter.token_nll.mean().item(), rel=1e-9)
    assert math.isfinite(bpb) and all(p.requires_grad for p in model.parameters())
    return meter, model


# ----------------------------------------------------------------------------- plans


def test_find_documents_partitions_the_targets():
    t = torch.tensor
    assert tg.find_documents(t([1, 5, 6, 1, 7, 1, 1, 8])) == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert tg.find_documents(t([4, 5, 1, 7, 8])) == [(0, 2), (2, 4)]  # no leading BOS: the first document at 0
    assert tg.find_documents(t([1, 5, 6, 1])) == [(0, 3)]  # a final BOS is the last target, not a document
    assert tg.find_documents(t([1])) == [] and tg.find_documents(t([1, 2])) == [(0, 1)]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        toks = torch.randint(0, 4, (int(torch.randint(2, 60, (1,), generator=g)),), generator=g)
        docs = tg.find_documents(toks)
        assert [i for s, e in docs for i in range(s, e)] == list(range(toks.numel() - 1))
        assert all(toks[s] == tg.BOS_ID for s, _ in docs[1:]) and all(e > s for s, e in docs)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_lora_batches_share_a_phase_among_the_ranks_by_cost(world):
    g = torch.Generator().manual_seed(world)
    lens = torch.randint(1, 3000, (50,), generator=g).tolist()
    starts = [sum(lens[:i]) for i in range(50)]
    docs = [(s, s + n) for s, n in zip(starts, lens)]
    h = dataclasses.replace(tg.Hyperparameters(), ttt_batch_size=4, ttt_chunk_size=48, eval_seq_len=2048)
    plans = [tg.lora_batches(docs, h, tg.Runtime(rank=r, world_size=world)) for r in range(world)]
    got = [d for p in plans for b in p for d in b]
    assert sorted(got) == docs  # every document once, on one rank
    for p in plans:
        assert all(len(b) <= 4 and [e - s for s, e in b] == sorted(e - s for s, e in b) for b in p)
    cost = lambda b: 4 * sum(min((c + 1) * 48, 2048) for c in range(math.ceil(max(e - s for s, e in b) / 48)))
    loads = [sum(cost(b) for b in p) for p in plans]
    assert max(loads) - min(loads) <= max(cost(b) for p in plans for b in p)  # greedy: within one batch
    costs = [cost(b) for b in plans[0]]
    assert costs == sorted(costs, reverse=True)  # the costliest batches first
    assert all(len(b) == 4 for p in plans for b in p if b[0] != min(docs, key=lambda d: (d[1] - d[0], d[0])))


def test_plan_phases():
    assert tg.plan_phases(10, 6, 3) == [("1/3", 0, 2, True), ("2/3", 2, 4, True), ("3/3", 4, 6, True),
                                        ("suffix", 6, 10, False)]
    assert tg.plan_phases(5, 2500, 3) == [("1/3", 0, 1, True), ("2/3", 1, 3, True), ("3/3", 3, 5, False)]
    assert tg.plan_phases(5, 2, 3) == [("2/3", 0, 1, True), ("3/3", 1, 2, True), ("suffix", 2, 5, False)]
    assert tg.plan_phases(5, 6, 0) == tg.plan_phases(5, 0, 3) == [("suffix", 0, 5, False)]
    assert tg.plan_phases(0, 6, 3) == []


@pytest.mark.parametrize("chunk,L", [(32, 128), (48, 2048), (128, 128), (7, 20), (1, 1)])
def test_lora_window_holds_the_chunk_and_at_most_L_tokens(chunk, L):
    for c in range(3 * L // chunk + 2):
        start, length = tg.lora_window(c, chunk, L)
        assert 0 <= start and length <= L and start + length == (c + 1) * chunk  # ends at the chunk's last input
        assert start == 0 or length == L  # the whole document prefix, or a full window
        assert length >= chunk and start <= c * chunk


# ----------------------------------------------------------------------------- the adapted forward


@pytest.mark.parametrize("recurrence", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_adapted_forward_with_zero_b_is_bitwise_the_base(lora, recurrence, grad):
    h, rt, state, tokens, _ = lora
    model = fresh(h, rt, state)
    model.recurrence_active = recurrence
    assert len(model.virtual_layers()) == (6 if recurrence else 4)  # loops, lanes (layer 3), VE, gates all on
    ids = torch.stack([tokens[:100], tokens[300:400], tokens[523:623]])  # slot 2 starts at a BOS
    adapters = tg.DocLoRA(h, len(model.virtual_layers()), rt.device)
    assert all(m.A.abs().sum() > 0 for m in adapters.modules() if isinstance(m, tg.BatchedLoRA))
    with torch.set_grad_enabled(grad):
        base = model.forward_hidden(ids)
        ours = model.forward_hidden(ids, adapters)
        assert torch.equal(base, ours)
        assert torch.equal(model.logits(base), model.logits(ours, adapters))
        for kind in ("q", "k", "v", "o", "mlp", "head"):  # every adapter is wired in: a non-zero B moves the output
            for i, layer in enumerate(adapters.layers if kind != "head" else [adapters]):
                target = getattr(layer, kind)
                with torch.no_grad():
                    target.B.normal_(0.0, 0.1)
                moved = model.logits(model.forward_hidden(ids, adapters), adapters)
                assert not torch.allclose(moved, model.logits(base), atol=1e-6), (kind, i)
                adapters.reset()
    with pytest.raises(ValueError, match="layers"):
        model.forward_hidden(ids, tg.DocLoRA(h, 5, rt.device))


def test_lora_optimizer_is_adamw_with_beta1_zero_and_reset_zeroes_its_state():
    h = dataclasses.replace(tg.Hyperparameters(), ttt_lora_lr=0.01, ttt_weight_decay=0.5, ttt_beta2=0.9)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, 5))
    opt = tg.lora_optimizer([p], h, torch.device("cpu"))
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.01, (0.0, 0.9), tg.LORA_ADAM_EPS, 0.5)
    ref = p.detach().clone()
    grads = [torch.randn(3, 4, 5) for _ in range(3)]
    v = torch.zeros_like(ref)
    for t, gr in enumerate(grads, 1):  # by hand: p <- p (1 - lr wd) - lr g / (sqrt(v / (1 - b2^t)) + eps)
        p.grad = gr.clone()
        opt.step()
        v = 0.9 * v + 0.1 * gr * gr
        ref = ref * (1 - 0.01 * 0.5) - 0.01 * gr / ((v / (1 - 0.9 ** t)).sqrt() + tg.LORA_ADAM_EPS)
    assert torch.allclose(p.detach(), ref, rtol=1e-5, atol=1e-6)
    tg.reset_optimizer(opt)
    assert all(not x.any() for st in opt.state.values() for x in st.values())
    before = p.detach().clone()  # after a reset the first step is Adam's first step again
    p.grad = grads[0].clone()
    opt.step()
    first = before * (1 - 0.005) - 0.01 * grads[0] / (grads[0].abs() + tg.LORA_ADAM_EPS)
    assert torch.allclose(p.detach(), first, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the pass


def direct_per_document_nll(model: tg.GPT, tokens: torch.Tensor, chunk: int, L: int) -> torch.Tensor:
    """Each document alone, chunk by chunk, through the plain forward: chunk c's targets from the window
    of the document's last L tokens ending at the chunk's last input."""
    total = tokens.numel() - 1
    out = torch.full((total,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        for s, e in tg.find_documents(tokens):
            for c in range(math.ceil((e - s) / chunk)):
                ws, _ = tg.lora_window(c, chunk, L)
                last = min(e - s, (c + 1) * chunk)  # the chunk's end, inside the document
                logits = model.forward_logits(tokens[s + ws:s + last][None])[0].float()
                j = torch.arange(c * chunk, last)
                out[s + j] = F.cross_entropy(logits[j - ws], tokens[s + j + 1], reduction="none").double()
    return out


@pytest.mark.parametrize("lead_bos", [True, False])
def test_lora_lr0_without_phases_is_plain_per_document_scoring(lora, lead_bos):
    h, rt, state, tokens, luts = lora
    h = dataclasses.replace(h, ttt_lora_lr=0.0)
    toks = tokens if lead_bos else tokens[5:]  # a stream that starts inside a document
    meter, model = run(lora, h=h, tokens=toks)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no phases: base untouched
    direct = direct_per_document_nll(fresh(h, rt, state), toks, h.ttt_chunk_size, h.eval_seq_len)
    assert torch.allclose(meter.token_nll, direct, rtol=0, atol=2e-5)
    # the adapters were stepped (lr 0): B stays exactly zero and A unchanged, so the scores equal the base's
    scorer = tg.LoraTTT(h, rt, fresh(h, rt, state), toks.clone(), luts, tg.BpbMeter(rt.device))
    a0 = [m.A.detach().clone() for m in scorer.lora.modules() if isinstance(m, tg.BatchedLoRA)]
    docs = tg.find_documents(toks)[:3]
    scorer.score_batch(docs)
    mods = [m for m in scorer.lora.modules() if isinstance(m, tg.BatchedLoRA)]
    assert all(torch.equal(m.A, a) for m, a in zip(mods, a0)) and all(not m.B.any() for m in mods)
    steps = max(math.ceil((e - s) / h.ttt_chunk_size) for s, e in docs) - 1  # every chunk but the longest's last
    assert [st["step"].item() for st in scorer.opt.state.values()] == [steps] * len(mods) * 2


def test_lora_adapts_within_documents_only_after_their_first_chunk(lora):
    h, rt, state, tokens, luts = lora
    adapted, _ = run(lora)
    plain, _ = run(lora, h=dataclasses.replace(h, ttt_lora_lr=0.0))
    C = h.ttt_chunk_size
    for s, e in tg.find_documents(tokens):
        first = slice(s, min(e, s + C))
        assert torch.equal(adapted.token_nll[first], plain.token_nll[first])  # chunk 0: fresh adapters (B = 0)
        if e - s > C:
            gap = (adapted.token_nll[s + C:e] - plain.token_nll[s + C:e]).abs().max().item()
            assert gap > 1e-3, (s, e, gap)
    assert adapted.local_bpb() < plain.local_bpb()  # a small lr on a random model: adapting helps


def _warm_a_reset(self):
    """LEAK (planted): a new batch zeroes B only, so A keeps what earlier documents taught it."""
    with torch.no_grad():
        for m in self.adapters:
            m.B.zero_()


@pytest.mark.parametrize("warm_a", [False, True])
def test_a_documents_scores_do_not_depend_on_its_batch(lora, monkeypatch, warm_a):
    # Batches are sorted by length, so a document's batch-mates and the batches before it are not its
    # stream predecessors: its scores must not depend on them. Score every document alone (batch size 1)
    # and all together in batches of 3 and of 11: bitwise-close per target.
    h, rt, state, tokens, luts = lora
    if warm_a:
        monkeypatch.setattr(tg.DocLoRA, "reset", _warm_a_reset)
    runs = [run(lora, h=dataclasses.replace(h, ttt_batch_size=b))[0].token_nll for b in (1, 3, 11)]
    gaps = [(r - runs[0]).abs().max().item() for r in runs[1:]]
    same = max(gaps) < 1e-5
    assert same != warm_a  # the planted warm A makes scores depend on the batches before


def test_lora_batches_are_sorted_by_length_and_the_tilt_reads_in_stream_order(lora, monkeypatch):
    h, rt, state, tokens, luts = lora
    batches, groups = [], []
    real_score, real_flush = tg.LoraTTT.score_batch, tg.LoraTTT.flush
    monkeypatch.setattr(tg.LoraTTT, "score_batch", lambda self, docs: (batches.append(docs), real_score(self, docs)))
    monkeypatch.setattr(tg.LoraTTT, "flush", lambda self, g: (groups.append(g), real_flush(self, g)))
    run(lora, ngram=True)
    lengths = [e - s for b in sorted(batches, key=lambda b: b[0][1] - b[0][0]) for s, e in b]
    assert lengths == sorted(lengths) and len(batches) == 4  # 11 documents cut by length, 3 per batch
    docs = tg.find_documents(tokens)
    assert groups == [[(docs[i][0], docs[min(i + 2, 10)][1]) for i in range(0, 11, 3)]]


def test_compile_warm_up_runs_on_random_tokens_and_leaves_no_trace(lora, monkeypatch):
    h, rt, state, tokens, luts = lora
    plain, _ = run(lora, ngram=True)
    scorer = tg.LoraTTT(h, rt, fresh(h, rt, state), tokens, luts, tg.BpbMeter(rt.device))
    assert scorer.warm_up() == 0.0  # eager (the CPU): nothing to compile, nothing run
    calls = []

    def fake_compile(fn, h, rt, dynamic=False):  # stands in for torch.compile: records the shapes it sees
        assert dynamic
        return lambda x, y, hint: (calls.append((tuple(x.shape), hint is not None)), fn(x, y, hint))[1]

    monkeypatch.setattr(tg, "maybe_compile", fake_compile)
    warmed, _ = run(lora, ngram=True)
    B, C, L = h.ttt_batch_size, h.ttt_chunk_size, h.eval_seq_len
    assert calls[:2] == [((B, C), True), ((B, L), True)]  # one chunk and a full window, a full batch
    # each step computes the documents still running only (at least two slots): a finished one costs nothing
    running = [max(min(2, B), sum(c * C < e - s for s, e in b))
               for b in tg.lora_batches(tg.find_documents(tokens), h, rt)
               for c in range(math.ceil(max(e - s for s, e in b) / C))]
    assert [shape[0] for shape, _ in calls[2:]] == running and min(running) < B
    assert torch.equal(warmed.token_nll, plain.token_nll)  # fresh adapters afterwards: the same scores


def test_compiled_step_is_traced_twice_in_the_warm_up_and_never_again(lora, monkeypatch):
    # dynamo alone (backend "eager": its guards, no code generation): the warm-up's two graphs (one chunk,
    # where duck sizing ties T to the chunk, and every longer window) must serve the whole pass; a guard
    # that fails on validation batches (views, .grad, a batch size) would recompile on the GPU for minutes
    import torch._dynamo
    import torch._dynamo.utils
    h, rt, state, tokens, luts = lora
    h = dataclasses.replace(h, phased_ttt_num_phases=2)
    monkeypatch.setattr(tg, "maybe_compile", lambda fn, h, rt, dynamic=False:
                        torch.compile(fn, dynamic=dynamic, fullgraph=True, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    frames = []
    real_warm_up = tg.LoraTTT.warm_up

    def warm_up(self):
        out = real_warm_up(self)
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(tg.LoraTTT, "warm_up", warm_up)
    compiled, _ = run(lora, h=h, ngram=True)
    assert frames == [2] and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_phase_sgd_changes_the_base_and_later_documents_see_it(lora):
    h, rt, state, tokens, luts = lora
    phased = dataclasses.replace(h, phased_ttt_num_phases=2)  # prefix 6 docs: phases [0, 3) [3, 6), then 5 more
    trace = []
    m1, model = run(lora, h=phased, trace=trace)
    m0, same = run(lora, h=dataclasses.replace(phased, global_ttt_lr=0.0))
    assert all(torch.equal(v, state[k]) for k, v in same.state_dict().items())
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert "tok_emb.weight" in moved and "blocks.0.attn.c_q.weight" in moved
    docs = tg.find_documents(tokens)
    b1, b2 = docs[3][0], docs[6][0]  # the first targets after phase 1 and after phase 2
    L = h.eval_seq_len  # each phase's SGD: all targets scored so far in whole L-target sequences, one step
    assert [(min(i), max(i)) for k, i in trace if k == "global"] == [(lo, lo + (hi - lo) // L * L - 1)
                                                                      for lo, hi in [(0, b1), (0, b2)]]  # cumulative
    assert torch.equal(m1.token_nll[:b1], m0.token_nll[:b1])  # phase 1 is scored by the artifact's weights
    for lo, hi in [(b1, b2), (b2, tokens.numel() - 1)]:
        assert (m1.token_nll[lo:hi] != m0.token_nll[lo:hi]).float().mean() > 0.9  # later phases: the new base
    with_ngram, _ = run(lora, h=phased, ngram=True)
    assert not torch.equal(with_ngram.token_nll, m1.token_nll)


@pytest.mark.parametrize("env,name", [
    ({"TTT_LORA_RANK": "0"}, "TTT_LORA_RANK"), ({"TTT_LORA_ALPHA": "0"}, "TTT_LORA_ALPHA"),
    ({"TTT_LORA_LR": "-1e-4"}, "TTT_LORA_LR"), ({"TTT_CHUNK_SIZE": "0"}, "TTT_CHUNK_SIZE"),
    ({"TTT_CHUNK_SIZE": "4096"}, "TTT_CHUNK_SIZE"), ({"TTT_BATCH_SIZE": "0"}, "TTT_BATCH_SIZE"),
    ({"TTT_WEIGHT_DECAY": "-0.5"}, "TTT_WEIGHT_DECAY"), ({"TTT_BETA2": "1"}, "TTT_BETA2"),
    ({"TTT_LORA_LR": "0.5", "TTT_WEIGHT_DECAY": "2"}, "TTT_WEIGHT_DECAY"),
    ({"PHASED_TTT_NUM_PHASES": "-1"}, "PHASED_TTT_NUM_PHASES"),
    ({"PHASED_TTT_PREFIX_DOCS": "-3"}, "PHASED_TTT_PREFIX_DOCS"), ({"GLOBAL_TTT_LR": "-0.1"}, "GLOBAL_TTT_LR"),
    ({"TTT_BATCH_SIZE": "4.5"}, "TTT_BATCH_SIZE"), ({"TTT_LORA_ENABLED": "maybe"}, "TTT_LORA_ENABLED"),
])
def test_bad_lora_settings_name_the_variable(env, name):
    with pytest.raises(tg.ConfigError, match=name):
        tg.Hyperparameters.from_env(env)


def test_lora_settings_defaults_and_modes():
    h = tg.Hyperparameters()
    assert (h.ttt_lora_enabled, h.ttt_lora_rank, h.ttt_lora_alpha, h.ttt_lora_lr, h.ttt_chunk_size) == (
        False, 80, 144.0, 1e-4, 48)
    assert (h.ttt_batch_size, h.ttt_weight_decay, h.ttt_beta2) == (64, 0.5, 0.99)
    assert (h.phased_ttt_num_phases, h.phased_ttt_prefix_docs, h.global_ttt_lr) == (3, 2500, 0.001)
    assert tg.lora_modes(h) == []
    on = dataclasses.replace(h, ttt_lora_enabled=True)
    assert tg.lora_modes(on) == [True] and tg.lora_label(True) == "lora_ttt_ngram"
    assert tg.lora_modes(dataclasses.replace(on, eval_ablations=True)) == [False, True]
    assert tg.lora_modes(dataclasses.replace(on, ngram_tilt=False)) == [False] and tg.lora_label(False) == "lora_ttt"
    w = tg.env_typo_warnings({"GLOBAL_TTT_MOMENTUM": "0.5", "TTT_BETA1": "0.9"})
    assert len(w) == 2 and all("no longer a setting" in x for x in w)
