"""DATA: shards, validation tokens, TokenLoader, rank slices. Run: python3 -m pytest -q tests/test_data.py"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg

from conftest import TINY

SEQ = 16
VOCAB = 60000


def make_data_dir(root: Path, lengths=(3000, 2200, 50, 1700), vocab: int = VOCAB) -> Path:
    """Train shards whose tokens identify (shard, position): shard i holds base_i + arange(n)."""
    ds = root / "datasets" / f"fineweb10B_sp{vocab}"
    ds.mkdir(parents=True, exist_ok=True)
    base = 0
    for i, n in enumerate(lengths):
        tg.write_shard(ds / f"fineweb_train_{i:06d}.bin", (base + np.arange(n)) % vocab)
        base += n
    tg.write_shard(ds / "fineweb_val_000000.bin", np.arange(4 * SEQ + 1) % vocab)
    return root


def loader_for(data_dir: str, seed: int = 1, global_seqs: int = 24, seq: int = SEQ, vocab: int = VOCAB):
    pattern = tg.Hyperparameters(data_dir=data_dir, vocab_size=vocab).train_files  # the path the trainer uses
    return tg.TokenLoader(pattern, seq, global_seqs, seed, vocab)


def draws(loader, n: int = 6):
    return [loader.next_windows() for _ in range(n)]


# ----------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    toks = np.random.default_rng(0).integers(0, 65535, size=12345)
    p = tmp_path / "s.bin"
    tg.write_shard(p, toks)
    assert p.stat().st_size == 1024 + 2 * toks.size
    assert tg.read_shard_header(p) == toks.size
    assert tg.read_shard_header(str(p)) == toks.size
    mm = tg.open_shard(p)
    assert mm.dtype == np.dtype("<u2") and mm.shape == (toks.size,)
    np.testing.assert_array_equal(np.asarray(mm).astype(np.int64), toks)
    header = np.fromfile(p, dtype="<i4", count=256)
    assert list(header[:3]) == [tg.SHARD_MAGIC, tg.SHARD_VERSION, toks.size] and not header[3:].any()


def test_empty_shard_round_trip(tmp_path):
    p = tmp_path / "e.bin"
    tg.write_shard(p, np.array([], dtype=np.int64))
    assert tg.read_shard_header(p) == 0
    assert tg.open_shard(p).shape == (0,)


def _corrupt(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.bin"
    tg.write_shard(p, np.arange(500))
    raw = bytearray(p.read_bytes())
    if kind == "magic":
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif kind == "version":
        raw[4:8] = np.array([2], dtype="<i4").tobytes()
    elif kind == "truncated_header":
        raw = raw[:600]
    elif kind == "truncated_tokens":
        raw = raw[:-7]
    elif kind == "too_long":
        raw += b"\0\0"
    elif kind == "count":
        raw[8:12] = np.array([501], dtype="<i4").tobytes()
    elif kind == "negative":
        raw[8:12] = np.array([-1], dtype="<i4").tobytes()
    elif kind == "empty":
        raw = b""
    p.write_bytes(bytes(raw))
    return p


@pytest.mark.parametrize("kind", ["magic", "version", "truncated_header", "truncated_tokens", "too_long", "count",
                                  "negative", "empty"])
def test_bad_shards_raise_data_error_naming_the_file(tmp_path, kind):
    p = _corrupt(tmp_path, kind)
    with pytest.raises(tg.DataError) as ei:
        tg.read_shard_header(p)
    assert str(p) in str(ei.value)
    with pytest.raises(tg.DataError):
        tg.open_shard(p)


def test_missing_shard_is_data_error(tmp_path):
    with pytest.raises(tg.DataError, match="nope.bin"):
        tg.read_shard_header(tmp_path / "nope.bin")


def test_no_shards_says_how_to_get_them(tmp_path):
    h = dataclasses.replace(TINY, data_dir=str(tmp_path) + "/", vocab_size=1024)
    for fn in (lambda: tg.load_validation_tokens(h), lambda: tg.new_train_loader(h)):
        with pytest.raises(tg.DataError) as ei:
            fn()
        msg = str(ei.value)
        assert "cached_challenge_fineweb" in msg and "DATA_DIR" in msg
        assert str(tmp_path) in msg


def test_validation_tokens(tmp_path):
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    toks = np.arange(1000) % 1024
    tg.write_shard(ds / "fineweb_val_000000.bin", toks[:600])
    tg.write_shard(ds / "fineweb_val_000001.bin", toks[600:])
    h = dataclasses.replace(TINY, data_dir=str(tmp_path), vocab_size=1024, eval_seq_len=128)
    v = tg.load_validation_tokens(h)
    # shards are concatenated in order and cut to a whole number of sequences plus one target
    assert v.dtype == torch.int64 and v.numel() == 7 * 128 + 1
    np.testing.assert_array_equal(v.numpy(), toks[: 7 * 128 + 1])


def test_validation_token_out_of_vocab(tmp_path):
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    toks = np.arange(1000) % 1000
    toks[500] = 1024
    tg.write_shard(ds / "fineweb_val_000000.bin", toks)
    h = dataclasses.replace(TINY, data_dir=str(tmp_path), vocab_size=1024, eval_seq_len=128)
    with pytest.raises(tg.DataError, match="1024"):
        tg.load_validation_tokens(h)


def test_validation_too_short(tmp_path):
    ds = tmp_path / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    tg.write_shard(ds / "fineweb_val_000000.bin", np.arange(128))
    h = dataclasses.replace(TINY, data_dir=str(tmp_path), vocab_size=1024, eval_seq_len=128)
    with pytest.raises(tg.DataError, match="EVAL_SEQ_LEN"):
        tg.load_validation_tokens(h)


def test_training_token_out_of_vocab(tmp_path):
    root = make_data_dir(tmp_path, lengths=(400,))
    loader = loader_for(str(root), global_seqs=8, vocab=VOCAB)
    loader.vocab_size = 100  # the shard holds ids up to 399
    with pytest.raises(tg.DataError, match="fineweb_train_000000.bin"):
        loader.micro_batch(loader.next_windows(), 0, 8, torch.device("cpu"))


# ----------------------------------------------------------------------------- loader


def test_same_seed_same_windows_different_seed_different(tmp_path):
    root = str(make_data_dir(tmp_path))
    a, b, c = draws(loader_for(root, seed=7)), draws(loader_for(root, seed=7)), draws(loader_for(root, seed=8))
    assert a == b
    assert a != c


def test_order_does_not_depend_on_path_spelling(tmp_path):
    root = make_data_dir(tmp_path / "a" / "b")
    os.symlink(root, tmp_path / "link")
    (tmp_path / "a" / "c").mkdir()
    spellings = [str(root) + "/", str(tmp_path) + "/a/./b//", str(tmp_path / "a" / "c" / ".." / "b"),
                 str(tmp_path / "link"), os.path.relpath(root)]
    ref = draws(loader_for(spellings[0], seed=3))
    for s in spellings[1:]:
        assert draws(loader_for(s, seed=3)) == ref, s


def test_data_dir_with_glob_metacharacters(tmp_path):
    root = make_data_dir(tmp_path / "run[1]")
    assert draws(loader_for(str(root), seed=3)) == draws(loader_for(str(make_data_dir(tmp_path / "plain")), seed=3))


def test_windows_lie_inside_their_shard(tmp_path):
    lengths = (3000, 2200, SEQ, 1700, SEQ + 1, 2 * SEQ + 3)
    root = str(make_data_dir(tmp_path, lengths=lengths))
    for seed in range(4):
        loader = loader_for(root, seed=seed, global_seqs=40)
        for windows in draws(loader, 12):
            assert len(windows) == 40
            for si, pos in windows:
                assert 0 <= pos and pos + SEQ + 1 <= lengths[si]
            x, y = loader.micro_batch(windows, 0, 40, torch.device("cpu"))
            assert x.shape == y.shape == (40, SEQ) and x.dtype == torch.int64
            torch.testing.assert_close(x[:, 1:], y[:, :-1])
            base = np.cumsum((0,) + lengths)
            expect = torch.tensor([base[si] + pos for si, pos in windows])
            torch.testing.assert_close(x[:, 0], expect)  # the window really is (shard, pos)
    # a shard shorter than SEQ+1 tokens is never drawn; the others are
    assert {si for w in draws(loader_for(root, global_seqs=40), 10) for si, _ in w} == {0, 1, 3, 4, 5}


@pytest.mark.parametrize("n_tokens", [10 * SEQ + 1, 10 * SEQ + 9, 37 * SEQ + 5, 64 * SEQ + 1])
def test_one_pass_visits_each_block_once(tmp_path, n_tokens):
    root = str(make_data_dir(tmp_path, lengths=(n_tokens,)))
    for seed in range(3):
        loader = loader_for(root, seed=seed, global_seqs=1)
        passes, cur = [], None
        for _ in range(4 * (n_tokens // SEQ)):
            (si, pos), = loader.next_windows()
            assert si == 0
            if loader.next[0] == 1:  # a cursor reset: a new pass began with this window
                cur = (int(loader.phase[0]), int(loader.blocks[0]), [])
                passes.append(cur)
            cur[2].append(pos)
        for phase, bc, got in passes[:-1]:  # every complete pass
            assert bc == (n_tokens - 1 - phase) // SEQ and 0 <= phase < SEQ
            assert sorted(got) == [phase + b * SEQ for b in range(bc)]
        assert len(passes) >= 3
        assert len({tuple(p[2]) for p in passes}) > 1  # passes are not all in the same order


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_micro_batches_partition_the_global_batch(tmp_path, world):
    root = str(make_data_dir(tmp_path))
    per = 3
    h = dataclasses.replace(TINY, train_seq_len=SEQ, train_batch_tokens=8 * per * SEQ)
    gseqs = h.train_batch_tokens // h.train_seq_len
    ref_loader = loader_for(root, seed=11, global_seqs=gseqs)
    loaders = [loader_for(root, seed=11, global_seqs=gseqs) for _ in range(world)]
    for _step in range(3):
        ref = list(tg.rank_micro_batches(ref_loader, h, tg.Runtime(rank=0, world_size=1)))
        assert len(ref) == 8
        ref_rows = torch.cat([x for x, _ in ref])
        assert ref_rows.shape == (gseqs, SEQ)
        by_index = {}
        per_rank = []
        for r in range(world):
            rt = tg.Runtime(rank=r, world_size=world)
            mbs = list(tg.rank_micro_batches(loaders[r], h, rt))
            assert len(mbs) == rt.grad_accum_steps == 8 // world
            for m, (x, y) in enumerate(mbs):
                assert x.shape == y.shape == (per, SEQ)
                by_index[m * world + r] = x
            per_rank.append({int(t) for x, _ in mbs for t in x[:, 0]})
        for r in range(world):  # rank slices are disjoint
            for q in range(r + 1, world):
                assert not per_rank[r] & per_rank[q]
        # together, in micro*world+rank order, they are exactly the 1-rank global batch
        assert sorted(by_index) == list(range(8))
        torch.testing.assert_close(torch.cat([by_index[i] for i in range(8)]), ref_rows)


def test_new_train_loader_on_fixture_dataset(tiny_h):
    loader = tg.new_train_loader(tiny_h)
    assert len(loader.files) == 2
    assert loader.global_seqs == tiny_h.train_batch_tokens // tiny_h.train_seq_len
    x, y = next(tg.rank_micro_batches(loader, tiny_h, tg.Runtime.single()))
    assert x.shape == (tiny_h.train_batch_tokens // tiny_h.train_seq_len // 8, tiny_h.train_seq_len)
    assert int(x.max()) < tiny_h.vocab_size
