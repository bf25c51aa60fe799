"""Shared fixtures: a tiny config and a tiny challenge-format dataset (CPU, seconds).

Run everything: python3 -m pytest -q tests        (see README "Testing")
The dataset uses the official sp1024 tokenizer and real FineWeb validation docs from the bench
folder beside the repository when it exists (docs/BENCH.md), else a small BPE trained on
generated text.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO.parent / "shared" / "bench"
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402

# One intra-op thread: the tensors are tiny, and with 2 threads OpenMP spin-waits stall
# badly whenever the 2 cores are shared with the e2e subprocesses.
torch.set_num_threads(1)

# A 4-block model that exercises every feature: GQA, XSA, partial RoPE, VE, looping (1,2 once
# more from step 3: 6 virtual layers), skip gates, two residual lanes on layer 3, SmearGate, the
# sparse attention gate; QUANT_MIN_NUMEL lowered so GPTQ really runs.
TINY = dataclasses.replace(
    tg.Hyperparameters(),
    num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, ve_dim=16, ve_layers="2,3",
    xsa_last_n=4, num_loops=1, loop_start=1, loop_end=2,
    enable_looping_at=0.5, parallel_start_layer=3, train_seq_len=128, eval_seq_len=128, eval_stride=32,
    train_batch_tokens=8192, iterations=6, warmup_steps=2, train_log_every=1,
    val_loss_every=0, max_wallclock_seconds=0.0, gptq_calibration_batches=4, quant_min_numel=1024,
    ttt_chunk=2048, pre_quant_ttt_chunk=2048, pre_quant_ttt_freeze=2, eval_batch_seqs=8,
    muon_momentum_warmup_steps=3, ema_decay=0.5, compile=False, checkpoint_path="",
)


def _synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her it an are were this which "
             "be or had not but have one all they their there been has when who will more no if out so "
             "river model stone light garden music winter city number paper market forest window").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))).capitalize() + "." for _ in range(n)]


def build_dataset(root: Path) -> tuple[Path, int]:
    """DATA_DIR layout with val + 2 train shards; returns (data_dir, vocab_size)."""
    import sentencepiece as spm
    tok_dir = root / "tokenizers"
    tok_dir.mkdir(parents=True, exist_ok=True)
    if (BENCH / "tokenizers" / "fineweb_1024_bpe.model").exists():
        vocab = 1024
        model = tok_dir / "fineweb_1024_bpe.model"
        model.write_bytes((BENCH / "tokenizers" / "fineweb_1024_bpe.model").read_bytes())
        with lzma.open(BENCH / "fineweb_val902_docs.jsonl.xz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line, _ in zip(f, range(200))]
    else:
        vocab = 320
        docs = _synthetic_docs(600)
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(docs))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tok_dir / f"fineweb_{vocab}_bpe"), vocab_size=vocab,
            model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
            minloglevel=2)
        model = tok_dir / f"fineweb_{vocab}_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    toks = np.array([t for d in sp.encode(docs) for t in [1, *d]], dtype=np.int64)
    ds = root / "datasets" / f"fineweb10B_sp{vocab}"
    ds.mkdir(parents=True, exist_ok=True)
    n_val = 12000
    tg.write_shard(ds / "fineweb_val_000000.bin", toks[:n_val])
    tg.write_shard(ds / "fineweb_train_000000.bin", toks[n_val:])
    tg.write_shard(ds / "fineweb_train_000001.bin", toks[n_val:][::-1])
    return root, vocab


def with_documents(tokens: torch.Tensor, starts) -> torch.Tensor:
    """A copy of `tokens` with BOS exactly at 0 and at `starts` (any other BOS becomes token 5), so
    that document tests see the same structure on the bench's FineWeb text and on synthetic text."""
    out = tokens.clone()
    out[out == tg.BOS_ID] = 5
    out[[0, *starts]] = tg.BOS_ID
    return out


def perturbed_tiny_model(dataset, seed: int = 0):
    """(h, rt, model): TINY on CPU with random non-zero projections (the zero-initialised ones
    would make quantization and context trivial)."""
    data_dir, vocab = dataset
    h = dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab)
    rt = tg.Runtime.single("cpu")
    tg.configure_logging(None, False)
    torch.manual_seed(seed)
    model = tg.build_model(h, rt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return h, rt, model


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> tuple[Path, int]:
    return build_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_h(dataset, tmp_path) -> tg.Hyperparameters:
    data_dir, vocab = dataset
    return dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab, run_id="test",
                               artifact_path=str(tmp_path / "model.ptz"))


@pytest.fixture
def rt_cpu() -> tg.Runtime:
    return tg.Runtime.single("cpu")


def hparams_env(h: tg.Hyperparameters) -> dict[str, str]:
    """A config as environment variables (for subprocess/torchrun runs of main())."""
    return {f.name.upper(): str(int(v)) if isinstance(v, bool) else str(v)
            for f in dataclasses.fields(h) for v in [getattr(h, f.name)]}


@pytest.fixture
def tiny_env(tiny_h) -> dict[str, str]:
    return hparams_env(tiny_h)
