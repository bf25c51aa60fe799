"""Tests for data/: the downloader, the shard builder and the verifier (CPU, no network)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"  # the bench folder (optional)
sys.path.insert(0, str(DATA))

import build_shards  # noqa: E402
import cached_challenge_fineweb as dl  # noqa: E402
import shard_io  # noqa: E402
import verify_shards  # noqa: E402

sentencepiece = pytest.importorskip("sentencepiece")


def run_script(name: str, *args: str, extra_path: Path | None = None, cwd: Path | None = None):
    """Run a data/ script as users do; no hub/data-dir variables leak in from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("PG_HUB_DIR", "DATA_DIR", "PYTHONPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run(
        [sys.executable, str(DATA / name), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


# ============================================================================ download


VAL_SHARDS, TRAIN_SHARDS = 1, 3


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A fake dataset repo: <hub>/datasets/manifest.json, shards, a tokenizer file."""
    root = tmp_path / "hub" / "datasets"
    shard_dir = root / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("val", VAL_SHARDS), ("train", TRAIN_SHARDS)):
        for i in range(n):
            shard_io.write_shard(shard_dir / shard_io.shard_name(split, i), rng.integers(0, 1024, 5000 + i))
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"fake sentencepiece model")
    (root / "tokenizers" / "fineweb_1024_bpe.vocab").write_text("<pad>\t0\n")
    manifest = {
        "datasets": [
            {
                "name": "fineweb10B_sp1024",
                "tokenizer_name": "sp_bpe_1024",
                "stats": {"files_val": VAL_SHARDS, "files_train": TRAIN_SHARDS},
            }
        ],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "hub"


class CountingFetcher:
    """Wraps a fetcher and records which remote files were fetched."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, remote_path, destination):
        self.calls.append(remote_path)
        self.inner(remote_path, destination)

    def shards(self):
        return [c for c in self.calls if c.endswith(".bin")]

    def __repr__(self):
        return repr(self.inner)


def fetch(hub: Path, data_dir: Path, train_shards: int = 2, **kw):
    fetcher = CountingFetcher(dl.LocalHubFetcher(hub))
    counts = dl.download("sp1024", train_shards, data_dir, fetcher, "datasets", log=lambda _: None, **kw)
    return fetcher, counts


def test_download_fetches_tokenizer_full_val_and_train_prefix(hub, tmp_path):
    data = tmp_path / "data"
    fetcher, counts = fetch(hub, data, train_shards=2)
    shard_dir = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in shard_dir.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_val_000000.bin",
    ]
    src = hub / "datasets"
    for rel in ("datasets/fineweb10B_sp1024/fineweb_train_000001.bin", "tokenizers/fineweb_1024_bpe.model"):
        assert (data / rel).read_bytes() == (src / rel).read_bytes()
    assert (data / "tokenizers" / "fineweb_1024_bpe.vocab").is_file()
    assert (data / "manifest.json").is_file()
    assert counts == {"fetched": 5, "skipped": 0, "bytes_fetched": counts["bytes_fetched"]}
    assert fetcher.calls[0] == "datasets/manifest.json"
    assert not list(data.rglob("*.partial"))


def test_resume_refetches_only_a_truncated_shard(hub, tmp_path):
    data = tmp_path / "data"
    fetch(hub, data)
    shard_dir = data / "datasets" / "fineweb10B_sp1024"
    victim = shard_dir / "fineweb_train_000001.bin"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)  # an interrupted copy
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir() if p != victim}

    fetcher, counts = fetch(hub, data)
    assert fetcher.shards() == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]
    assert counts["fetched"] == 1 and counts["skipped"] == 4
    assert shard_io.shard_problem(victim) is None
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir() if p != victim} == before


def test_resume_refetches_a_corrupt_header_and_fetches_more_train_shards(hub, tmp_path):
    data = tmp_path / "data"
    fetch(hub, data, train_shards=1)
    val = data / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    with open(val, "r+b") as f:  # same size, wrong magic
        f.write(np.array([123], dtype="<i4").tobytes())
    assert "bad magic" in shard_io.shard_problem(val)

    fetcher, _ = fetch(hub, data, train_shards=3)
    assert fetcher.shards() == [
        "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin",
    ]
    assert shard_io.shard_problem(val) is None


def test_a_bad_file_in_the_hub_is_an_error(hub, tmp_path):
    bad = hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(shard_io.DataToolError, match="fineweb_train_000000.bin fetched from .* is itself bad"):
        fetch(hub, tmp_path / "data")


def test_manifest_errors(hub, tmp_path):
    with pytest.raises(shard_io.DataToolError, match="--train-shards 4: sp1024 has only 3 training shards"):
        fetch(hub, tmp_path / "d1", train_shards=4)
    fetcher = dl.LocalHubFetcher(hub)
    with pytest.raises(shard_io.DataToolError, match="sp4096 is published in kevclark/parameter-golf"):
        dl.download("sp4096", 1, tmp_path / "d2", fetcher, "datasets", log=lambda _: None)
    with pytest.raises(shard_io.DataToolError, match="manifest.json not found in hub dir"):
        dl.download("sp1024", 1, tmp_path / "d3", fetcher, "elsewhere", log=lambda _: None)
    with pytest.raises(shard_io.DataToolError, match="--skip-manifest: no local manifest"):
        fetch(hub, tmp_path / "d4", skip_manifest=True)


def test_cli_download_with_hub_dir(hub, tmp_path):
    data = tmp_path / "data"
    args = ["--variant", "sp1024", "--train-shards", "1", "--hub-dir", str(hub), "--data-dir", str(data)]
    result = run_script("cached_challenge_fineweb.py", *args)
    assert result.returncode == 0, result.stderr
    assert "fineweb_val_000000.bin: fetched" in result.stdout
    assert "done: 4 fetched" in result.stdout
    again = run_script("cached_challenge_fineweb.py", *args)
    assert again.returncode == 0 and "done: 0 fetched" in again.stdout and "4 already present" in again.stdout


def test_hugging_face_fetch_layer(hub, tmp_path, monkeypatch):
    """hf_hub_download's contract as the fetcher uses it: a cache path, maybe a symlink;
    a bad cache entry is downloaded again with force_download."""
    import types

    cache, calls = tmp_path / "hf_cache", []
    cache.mkdir()

    def hf_hub_download(repo_id, filename, subfolder, repo_type, force_download=False):
        calls.append((repo_id, subfolder, filename, repo_type, force_download))
        blob = cache / f"blob{len(calls)}"
        data = (hub / subfolder / filename).read_bytes()
        blob.write_bytes(data if force_download or "train_000000" not in filename else data[:-2])
        link = cache / f"snapshot{len(calls)}"
        link.symlink_to(blob)  # the hub cache hands out snapshot symlinks
        return str(link)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    data = tmp_path / "data"
    counts = dl.download("sp1024", 1, data, dl.HuggingFaceFetcher("someone/repo"), "datasets", log=lambda _: None)
    assert counts["fetched"] == 4
    assert calls[0] == ("someone/repo", "datasets", "manifest.json", "dataset", False)
    assert ("someone/repo", "datasets/datasets/fineweb10B_sp1024", "fineweb_train_000000.bin", "dataset", True) in calls
    shard = data / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    assert not shard.is_symlink() and shard_io.shard_problem(shard) is None


def fake_hf_module(tmp_path: Path, body: str) -> Path:
    """A stand-in huggingface_hub package, so that no test ever touches the network."""
    pkg = tmp_path / "fake_modules" / "huggingface_hub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return pkg.parent


def test_offline_is_a_clear_error_without_traceback(tmp_path):
    offline = fake_hf_module(
        tmp_path,
        "class LocalEntryNotFoundError(FileNotFoundError):\n    pass\n"
        "def hf_hub_download(**kwargs):\n"
        "    raise LocalEntryNotFoundError('Cannot find the requested files in the disk cache and outgoing "
        "traffic has been disabled.\\nmore details')\n",
    )
    result = run_script("cached_challenge_fineweb.py", "--data-dir", str(tmp_path / "d"), extra_path=offline)
    assert result.returncode != 0
    assert "could not download datasets/manifest.json" in result.stderr
    assert "willdepueoai/parameter-golf" in result.stderr and "LocalEntryNotFoundError" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_huggingface_hub_says_how_to_install(tmp_path):
    missing = fake_hf_module(tmp_path, "raise ImportError('No module named huggingface_hub')\n")
    result = run_script("cached_challenge_fineweb.py", "--data-dir", str(tmp_path / "d"), extra_path=missing)
    assert result.returncode != 0
    assert "pip install -r requirements.txt" in result.stderr and "--hub-dir" in result.stderr
    assert "huggingface_hub" in (REPO / "requirements.txt").read_text()  # what that command installs
    assert "Traceback" not in result.stderr


def test_unknown_variant_is_a_clear_error(hub, tmp_path):
    result = run_script("cached_challenge_fineweb.py", "--variant", "gpt2", "--hub-dir", str(hub))
    assert result.returncode != 0
    assert "--variant 'gpt2' is not supported" in result.stderr and "byte260" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script(
        "cached_challenge_fineweb.py", "--variant", "sp8192", "--hub-dir", str(hub), "--data-dir", str(tmp_path / "d")
    )
    assert result.returncode != 0
    assert "sp8192 (fineweb10B_sp8192) is not in the manifest" in result.stderr
    assert "available: sp1024" in result.stderr and "Traceback" not in result.stderr


def fake_hub_module(monkeypatch, hf_hub_download) -> None:
    """Replace huggingface_hub in this process (the tests never reach the network)."""
    import types

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))


class LocalEntryNotFoundError(FileNotFoundError):
    """Named like huggingface_hub's error for "not in the cache and the hub cannot be reached"."""


class EntryNotFoundError(Exception):
    """Named like huggingface_hub's error for "no such file in the repo"."""


def raising(exc: Exception):
    calls = []

    def hf_hub_download(**kwargs):
        calls.append(kwargs)
        raise exc

    hf_hub_download.calls = calls
    return hf_hub_download


@pytest.mark.parametrize("exc", [LocalEntryNotFoundError("outgoing traffic has been disabled"),
                                 ConnectionError("Failed to establish a new connection"),
                                 TimeoutError("read timed out")])
def test_offline_rerun_uses_the_local_manifest(hub, tmp_path, monkeypatch, exc):
    data = tmp_path / "data"
    fetch(hub, data)  # an earlier, complete download (manifest, 1 val + 2 train shards, tokenizer)
    download = raising(exc)
    fake_hub_module(monkeypatch, download)
    warnings, lines = [], []
    counts = dl.download("sp1024", 2, data, dl.HuggingFaceFetcher("someone/repo"), "datasets",
                         log=lines.append, warn=warnings.append)
    assert counts == {"fetched": 0, "skipped": 5, "bytes_fetched": 0}
    assert len(download.calls) == 1 and download.calls[0]["filename"] == "manifest.json"
    assert len(warnings) == 1 and type(exc).__name__ in warnings[0]
    assert f"using the local manifest {data / 'manifest.json'}" in warnings[0]
    # a file that is not there yet still needs the network: a clear error naming it
    with pytest.raises(shard_io.DataToolError, match="could not download .*fineweb_train_000002.bin"):
        dl.download("sp1024", 3, data, dl.HuggingFaceFetcher("someone/repo"), "datasets",
                    log=lines.append, warn=warnings.append)


def test_offline_rerun_from_the_command_line(hub, tmp_path):
    data = tmp_path / "data"
    fetch(hub, data)
    offline = fake_hf_module(
        tmp_path,
        "class LocalEntryNotFoundError(FileNotFoundError):\n    pass\n"
        "def hf_hub_download(**kwargs):\n"
        "    raise LocalEntryNotFoundError('Cannot find the requested files in the disk cache and outgoing "
        "traffic has been disabled.')\n",
    )
    result = run_script("cached_challenge_fineweb.py", "--train-shards", "2", "--data-dir", str(data),
                        extra_path=offline)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "using the local manifest" in result.stderr
    assert "done: 0 fetched" in result.stdout and "5 already present" in result.stdout


def test_a_missing_repo_file_is_not_taken_for_being_offline(hub, tmp_path, monkeypatch):
    data = tmp_path / "data"
    fetch(hub, data)
    fake_hub_module(monkeypatch, raising(EntryNotFoundError("404 Client Error: Entry Not Found")))
    with pytest.raises(shard_io.DataToolError, match="EntryNotFoundError.*\n.*--skip-manifest uses it"):
        dl.download("sp1024", 1, data, dl.HuggingFaceFetcher("someone/repo"), "elsewhere", log=lambda _: None,
                    warn=lambda _: pytest.fail("no fallback for a file the repo does not have"))
    assert dl.is_network_failure(LocalEntryNotFoundError()) and dl.is_network_failure(ConnectionError())
    assert not dl.is_network_failure(EntryNotFoundError())


def test_offline_without_a_local_manifest_is_an_error(tmp_path, monkeypatch):
    fake_hub_module(monkeypatch, raising(ConnectionError("no route to host")))
    with pytest.raises(shard_io.DataToolError, match="could not download datasets/manifest.json"):
        dl.download("sp1024", 1, tmp_path / "d", dl.HuggingFaceFetcher("someone/repo"), "datasets",
                    log=lambda _: None, warn=lambda _: None)


@pytest.fixture
def byte_hub(tmp_path: Path) -> Path:
    """A fake dataset repo with the official byte260 layout: dataset fineweb10B_byte260, tokenizer
    pure_byte_260 listed by "path" (tokenizers/fineweb_pure_byte_260.json)."""
    root = tmp_path / "bhub" / "datasets"
    shard_dir = root / "datasets" / "fineweb10B_byte260"
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("val", 1), ("train", 2)):
        for i in range(n):
            toks = rng.integers(4, 260, 3000)
            toks[0] = 1  # BOS
            shard_io.write_shard(shard_dir / shard_io.shard_name(split, i), toks)
    (root / "tokenizers").mkdir()
    tok = {"tokenizer_type": "pure_byte", "vocab_size": 260,
           "config": {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "byte_offset": 4, "byte_count": 256}}
    (root / "tokenizers" / "fineweb_pure_byte_260.json").write_text(json.dumps(tok))
    manifest = {
        "datasets": [{"name": "fineweb10B_byte260", "tokenizer_name": "pure_byte_260", "tokenizer_kind": "byte",
                      "stats": {"files_val": 1, "files_train": 2}}],
        "tokenizers": [{"name": "pure_byte_260", "kind": "byte", "vocab_size": 260, "bos_id": 1, "eos_id": 2,
                        "path": "tokenizers/fineweb_pure_byte_260.json", "pad_id": 0, "unk_id": 3}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "bhub"


def test_byte260_variant(byte_hub, tmp_path, capsys):
    data = tmp_path / "data"
    lines = []
    counts = dl.download("byte260", 1, data, dl.LocalHubFetcher(byte_hub), "datasets", log=lines.append)
    assert counts["fetched"] == 3  # val, 1 train shard, the tokenizer description
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()) == [
        "datasets/fineweb10B_byte260/fineweb_train_000000.bin", "datasets/fineweb10B_byte260/fineweb_val_000000.bin",
        "manifest.json", "tokenizers/fineweb_pure_byte_260.json"]
    assert any("train_gpt.py reads sp<VOCAB> data" in line for line in lines)
    assert not any("is not at tokenizers/" in line for line in lines)
    assert verify_shards.main([str(data), "--variant", "byte260", "--check-tokens"]) == 0
    assert "fineweb_pure_byte_260.json: pure bytes, 260 ids" in capsys.readouterr().out
    shard = data / "datasets" / "fineweb10B_byte260" / "fineweb_train_000000.bin"
    toks = shard_io.read_shard_tokens(shard).astype(np.int64)
    toks[5] = 300
    shard_io.write_shard(shard, toks)
    assert verify_shards.main([str(data), "--check-tokens"]) == 1  # every fineweb10B_* folder, byte260 included
    assert "token id 300 >= vocabulary size 260" in capsys.readouterr().out
    with pytest.raises(shard_io.DataToolError, match="expected sp<VOCAB> .* or byte260"):
        dl.check_args("byte256", 1)


# ============================================================================ build

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will about"
).split()
NOUNS = (
    "river house garden city teacher winter music paper window market letter forest doctor student mountain "
    "story bridge kitchen engine harbor village summer morning question number family company system"
).split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    """English-like documents of single-spaced sentences (normal text that round-trips)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS + NOUNS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 2030)))
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(f"Doc {i}: " + " ".join(sentences))
    return docs


BAD_LINES = [  # interleaved into the corpus; expected accounting below
    b"this is not json\n",
    b'{"text": "unterminated\n',
    b"\n",
    b'{"text": "caf\xe9 latin-1"}\n',
    b'{"title": "no text field"}\n',
    b'{"text": 42}\n',
    b'{"text": ""}\n',
    b'{"text": "   "}\n',
    b'{"text": "lone surrogate \\ud800"}\n',
]
EXPECTED_BAD = {"blank_line": 1, "invalid_json": 2, "not_utf8": 2, "missing_text": 2, "empty_text": 2}
N_DOCS, N_VAL = 300, 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = synthetic_docs(N_DOCS)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "wb") as f:
        for i, doc in enumerate(docs):
            if i % 31 == 5 and i // 31 < len(BAD_LINES):
                f.write(BAD_LINES[i // 31])
            f.write((json.dumps({"text": doc, "id": i}) + "\n").encode())
    return path, docs


BUILD_ARGS = ["--vocab-size", "320", "--num-val-docs", str(N_VAL), "--shard-tokens", "3000"]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built")
    assert build_shards.main(["--input", str(corpus[0]), "--out", str(out), *BUILD_ARGS]) == 0
    return out


def shards(out: Path, split: str, vocab: int = 320) -> list[Path]:
    return sorted((out / "datasets" / f"fineweb10B_sp{vocab}").glob(f"fineweb_{split}_*.bin"))


def split_tokens(out: Path, split: str, vocab: int = 320) -> np.ndarray:
    return np.concatenate([np.asarray(shard_io.read_shard_tokens(p)) for p in shards(out, split, vocab)])


def processor(out: Path, vocab: int = 320):
    return sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizers" / f"fineweb_{vocab}_bpe.model"))


def test_build_layout_headers_and_token_counts(built):
    manifest = json.loads((built / "manifest.json").read_text())
    stats = manifest["datasets"][0]["stats"]
    assert manifest["datasets"][0]["name"] == "fineweb10B_sp320"
    assert manifest["tokenizers"][0]["model_path"] == "tokenizers/fineweb_320_bpe.model"
    for split in ("val", "train"):
        files = shards(built, split)
        assert len(files) == stats[f"files_{split}"] > 1
        assert [p.name for p in files] == [shard_io.shard_name(split, i) for i in range(len(files))]
        counts = []
        for p in files:
            assert shard_io.shard_problem(p) is None
            header = np.fromfile(p, dtype="<i4", count=3)
            assert header.tolist()[:2] == [20240520, 1]
            assert p.stat().st_size == 1024 + 2 * int(header[2])
            counts.append(int(header[2]))
        assert all(c == 3000 for c in counts[:-1]) and 0 < counts[-1] <= 3000
        assert sum(counts) == stats[f"tokens_{split}"]
        rel = f"datasets/fineweb10B_sp320/{files[0].name}"
        assert manifest["files"][rel]["sha256"] == shard_io.sha256_file(files[0])
    assert stats["docs_val"] == N_VAL and stats["docs_train"] == N_DOCS - N_VAL
    assert manifest["inputs"][0]["sha256"] and manifest["tokenizer_build"]["settings"]["byte_fallback"] is True


def test_every_document_is_bos_plus_tokens_and_split_by_documents(built, corpus):
    sp = processor(built)
    docs = corpus[1]
    for split, expected in (("val", docs[:N_VAL]), ("train", docs[N_VAL:])):
        toks = split_tokens(built, split)
        assert toks[0] == sp.bos_id() == 1
        starts = np.flatnonzero(toks == sp.bos_id())
        assert len(starts) == len(expected)
        pieces = np.split(toks, starts[1:])
        assert [sp.decode(p[1:].tolist()) for p in pieces] == expected
        assert [p[1:].tolist() for p in pieces] == sp.encode(expected)
        assert toks.max() < 320


def test_build_is_deterministic(built, corpus, tmp_path):
    out = tmp_path / "again"
    assert build_shards.main(["--input", str(corpus[0]), "--out", str(out), *BUILD_ARGS]) == 0
    first = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert first == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in first:
        assert (built / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_bad_lines_are_counted_and_reported(built, corpus, tmp_path, capsys):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["bad_lines"] == EXPECTED_BAD
    assert sum(1 for _ in open(corpus[0], "rb")) == N_DOCS + len(BAD_LINES)
    assert manifest["inputs"][0]["docs"] == N_DOCS
    # the report names the file and the counts
    out = tmp_path / "report"
    build_shards.main(["--input", str(corpus[0]), "--tokenizer", str(built / "tokenizers/fineweb_320_bpe.model"),
                       "--out", str(out), "--num-val-docs", str(N_VAL)])
    printed = capsys.readouterr().out
    expected = "blank_line 1, invalid_json 2, not_utf8 2, missing_text 2, empty_text 2"
    assert f"bad lines in {corpus[0]}: {expected}" in printed
    # reusing the tokenizer gives the same tokens (here all in one shard per split)
    for split in ("val", "train"):
        assert len(shards(out, split)) == 1
        assert np.array_equal(split_tokens(out, split), split_tokens(built, split))


def test_trained_tokenizer_round_trips_and_has_challenge_settings(built):
    sp = processor(built)
    assert sp.get_piece_size() == 320
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    for text in [
        "The teacher walked to the river in winter.",
        "A question about the 2024 market: was it 17 or 1999?",
        "Zebras quietly jumped over fuzzy boxes!",  # rare letters: merges or byte fallback
        "Ünïcödé and emoji 🙂 fall back to bytes.",
    ]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
    assert sp.encode("2024") == [sp.piece_to_id(d) for d in "2024"]  # split_digits
    assert not sp.id_to_piece(sp.encode("river")[0]).startswith("\u2581")  # no dummy prefix


def test_separate_val_and_train_files_compressed_and_directories(built, corpus, tmp_path):
    docs = corpus[1]
    val_gz = tmp_path / "val.jsonl.gz"
    with gzip.open(val_gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:5])
    train_dir = tmp_path / "train_texts"
    (train_dir / "sub").mkdir(parents=True)
    (train_dir / "b.txt").write_text(docs[6])
    (train_dir / "a.txt").write_text(docs[5])
    (train_dir / "sub" / "c.txt").write_text(docs[7])
    (train_dir / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (train_dir / ".hidden").write_text("ignored")
    with lzma.open(train_dir / "more.jsonl.xz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[8:10])
    out = tmp_path / "out"
    model = built / "tokenizers" / "fineweb_320_bpe.model"
    args = ["--val-docs", str(val_gz), "--train-docs", str(train_dir), "--tokenizer", str(model), "--out", str(out)]
    assert build_shards.main(args) == 0
    sp = processor(out)
    bos = sp.bos_id()
    # sorted path order: a.txt, b.txt, bad.txt (skipped), more.jsonl.xz, sub/c.txt
    expected = {"val": docs[:5], "train": [docs[5], docs[6], docs[8], docs[9], docs[7]]}
    for split, want in expected.items():
        toks = split_tokens(out, split)
        pieces = np.split(toks, np.flatnonzero(toks == bos)[1:])
        assert [sp.decode(p[1:].tolist()) for p in pieces] == want
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_lines"]["not_utf8"] == 1
    assert manifest["inputs"][1]["files"] == 5


def test_vocab_over_65535_is_refused(corpus, tmp_path, capsys):
    args = ["--input", str(corpus[0]), "--vocab-size", "65536", "--out", str(tmp_path / "o")]
    assert shard_io.run_cli(build_shards.main, args) == 1
    err = capsys.readouterr().err
    assert "--vocab-size 65536" in err and "at most 65,535" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(shard_io.DataToolError):
        shard_io.check_vocab_size(70_000, "tokenizer")
    shard_io.check_vocab_size(65_535, "tokenizer")


def test_build_cli_errors_are_clear(corpus, tmp_path):
    out = ["--vocab-size", "320", "--out", str(tmp_path / "o")]
    result = run_script("build_shards.py", "--input", str(tmp_path / "nope.jsonl"), *out)
    assert result.returncode == 1 and "--input" in result.stderr and "nope.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_script("build_shards.py", "--input", str(corpus[0]), "--num-val-docs", "1000", *out)
    assert result.returncode == 1 and "lower --num-val-docs" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken.jsonl.xz"
    broken.write_bytes(lzma.compress(corpus[0].read_bytes())[:-200])
    result = run_script("build_shards.py", "--val-docs", str(corpus[0]), "--train-docs", str(broken), *out)
    assert result.returncode == 1 and f"cannot read {broken}" in result.stderr and "Traceback" not in result.stderr


def test_built_output_serves_as_a_hub_and_verifies(built, tmp_path, capsys):
    data = tmp_path / "data"
    fetcher = CountingFetcher(dl.LocalHubFetcher(built))
    counts = dl.download("sp320", 2, data, fetcher, "", verify=True, log=print)
    files_val = json.loads((built / "manifest.json").read_text())["datasets"][0]["stats"]["files_val"]
    expected = files_val + 2 + 2  # all val shards, 2 train shards, model and vocab
    assert counts["fetched"] == expected
    assert f"sha256 of {expected} files matches" in capsys.readouterr().out
    assert verify_shards.main([str(data), "--variant", "sp320", "--check-tokens"]) == 0
    assert verify_shards.main([str(built), "--check-tokens"]) == 0
    victim = data / "datasets" / "fineweb10B_sp320" / "fineweb_train_000001.bin"
    with open(victim, "r+b") as f:
        f.seek(2000)
        f.write(b"\x00\x01")  # same size, different content: only the hash notices
    capsys.readouterr()
    assert verify_shards.main([str(data)]) == 1
    assert "fineweb_train_000001.bin: sha256 differs" in capsys.readouterr().out
    victim.with_name("fineweb_train_000000.bin").unlink()
    assert verify_shards.main([str(data), "--no-hash"]) == 1
    assert "missing index 000000" in capsys.readouterr().out


# ============================================================================ bench (optional)


@pytest.mark.skipif(not (BENCH / "prep_shards.py").is_file(), reason="the bench folder is not present")
def test_byte_identical_to_bench_prep_shards(tmp_path):
    """The bench's own shard script and ours agree byte for byte (real docs, small files)."""
    model = BENCH / "tokenizers" / "fineweb_1024_bpe.model"
    val, train = BENCH / "fineweb_val902_docs.jsonl.xz", BENCH / "mix_val_docs.jsonl.xz"
    ref = tmp_path / "ref"
    result = subprocess.run(
        [sys.executable, str(BENCH / "prep_shards.py"), str(model), str(ref), f"train={train}", f"val={val}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "ours"
    args = ["--val-docs", str(val), "--train-docs", str(train), "--tokenizer", str(model), "--out", str(out)]
    assert build_shards.main(args) == 0
    for split in ("val", "train"):
        name = f"fineweb_{split}_000000.bin"
        assert (out / "datasets" / "fineweb10B_sp1024" / name).read_bytes() == (ref / name).read_bytes()
