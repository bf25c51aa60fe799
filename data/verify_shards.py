"""Check a data folder (downloaded or built) before training on it.

    python data/verify_shards.py                      # ./data, every fineweb10B_* dataset
    python data/verify_shards.py OUT --variant sp4096 --check-tokens

For each dataset folder DATA/datasets/fineweb10B_sp{V}/ (or fineweb10B_byte260/) it checks that
  * validation and training shards are numbered 000000, 000001, ... without gaps,
    and that the validation split is complete (when the manifest gives its count);
  * every shard has the right header (magic 20240520, version 1) and exactly
    1024 + 2 * count bytes;
  * the tokenizer DATA/tokenizers/fineweb_{V}_bpe.model exists, loads, and has at
    most 65,535 pieces (byte260: tokenizers/fineweb_pure_byte_260.json, a JSON
    description of the byte tokenizer, as the official export writes it);
  * sha256 of every file matches DATA/manifest.json where the manifest lists one
    (build_shards.py writes them; the official manifest has none) -- skip with --no-hash;
  * with --check-tokens: every token id is below the vocabulary size, and the
    validation split starts with BOS.
Exit status 0 when everything is fine, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from shard_io import (
    BYTE_TOKENIZER_FILE,
    BYTE_VARIANT,
    MAX_VOCAB_SIZE,
    DataToolError,
    read_shard_tokens,
    run_cli,
    sha256_file,
    shard_problem,
    shard_token_count,
    tokenizer_file_name,
)


def load_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataToolError(f"{path} is not valid JSON: {exc}") from None
    return manifest if isinstance(manifest, dict) else {}


def numbered(files: list[Path], split: str) -> list[str]:
    """Problems with the numbering of one split's shards."""
    indices = sorted(int(re.fullmatch(rf"fineweb_{split}_(\d+)\.bin", f.name).group(1)) for f in files)
    missing = sorted(set(range(len(indices))) - set(indices))
    return [f"{split} shards are not numbered 0..{len(indices) - 1}: missing index {missing[0]:06d}"] if missing else []


def verify_dataset(data_dir: Path, dataset_dir: Path, manifest: dict, use_hash: bool, check_tokens: bool, log) -> int:
    """Check one dataset folder; return the number of problems found."""
    problems = 0

    def bad(what: str, why: str) -> None:
        nonlocal problems
        problems += 1
        log(f"  BAD  {what}: {why}")

    vocab_label = dataset_dir.name.removeprefix("fineweb10B_sp")
    log(f"{dataset_dir}")
    entries = [d for d in manifest.get("datasets", []) if isinstance(d, dict)]
    entry = next((d for d in entries if d.get("name") == dataset_dir.name), {})
    stats = entry.get("stats") or {}
    hashes = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}

    # --- tokenizer: (vocabulary size, BOS id) for the token checks, when known
    vocab = bos = None
    if dataset_dir.name == f"fineweb10B_{BYTE_VARIANT}":
        tokenizer = data_dir / "tokenizers" / BYTE_TOKENIZER_FILE
        vocab, bos = check_byte_tokenizer(tokenizer, bad, log)
    else:
        tokenizer = data_dir / "tokenizers" / tokenizer_file_name(int(vocab_label)) if vocab_label.isdigit() else None
        if tokenizer is None or not tokenizer.is_file():
            bad(f"tokenizers/fineweb_{vocab_label}_bpe.model", "missing (train_gpt.py needs it)")
        else:
            vocab, bos = check_sentencepiece(tokenizer, vocab_label, bad, log)

    # --- shards
    splits = {s: sorted(dataset_dir.glob(f"fineweb_{s}_*.bin")) for s in ("val", "train")}
    for split, files in splits.items():
        for problem in numbered(files, split):
            bad(dataset_dir.name, problem)
    if not splits["val"]:
        bad(dataset_dir.name, "no validation shards")
    if "files_val" in stats and len(splits["val"]) != int(stats["files_val"]):
        bad(dataset_dir.name, f"{len(splits['val'])} validation shards, manifest says {stats['files_val']}")
    if "files_train" in stats and len(splits["train"]) > int(stats["files_train"]):
        bad(dataset_dir.name, f"{len(splits['train'])} training shards, manifest lists only {stats['files_train']}")
    if not splits["train"]:
        log("  note: no training shards")

    tokens = {"val": 0, "train": 0}
    for split, files in splits.items():
        for path in files:
            rel = path.relative_to(data_dir).as_posix()
            problem = shard_problem(path)
            if problem is None and use_hash and rel in hashes and hashes[rel].get("sha256"):
                if sha256_file(path) != hashes[rel]["sha256"]:
                    problem = "sha256 differs from the manifest"
            if problem is None and check_tokens and vocab is not None:
                toks = read_shard_tokens(path)
                if toks.size and int(toks.max()) >= vocab:
                    problem = f"token id {int(toks.max())} >= vocabulary size {vocab}"
                elif split == "val" and path == files[0] and toks.size and bos is not None and int(toks[0]) != bos:
                    problem = f"validation does not start with BOS ({bos})"
            if problem is not None:
                bad(rel, problem)
                continue
            tokens[split] += shard_token_count(path)
    for split in ("val", "train"):
        log(f"  {split}: {len(splits[split])} shard(s), {tokens[split]:,} tokens in the valid ones")

    if tokenizer is not None and tokenizer.is_file() and use_hash:
        rel = tokenizer.relative_to(data_dir).as_posix()
        if rel in hashes and hashes[rel].get("sha256") and sha256_file(tokenizer) != hashes[rel]["sha256"]:
            bad(rel, "sha256 differs from the manifest")
    return problems


def check_sentencepiece(tokenizer: Path, vocab_label: str, bad, log) -> tuple[int | None, int | None]:
    """Load a SentencePiece model; returns (pieces, BOS id), or (None, None) when it cannot be loaded."""
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except ImportError:
        log("  note: sentencepiece not installed; tokenizer not loaded")
        return None, None
    except (RuntimeError, OSError) as exc:
        bad(tokenizer.name, f"does not load as a SentencePiece model ({str(exc).strip()})")
        return None, None
    n = sp.get_piece_size()
    if n > MAX_VOCAB_SIZE:
        bad(tokenizer.name, f"{n:,} pieces, more than uint16 shards can hold")
    elif vocab_label.isdigit() and n > int(vocab_label):
        bad(tokenizer.name, f"{n} pieces, more than the dataset name says ({vocab_label})")
    else:
        log(f"  ok   {tokenizer.name}: {n} pieces")
    return n, sp.bos_id()


def check_byte_tokenizer(path: Path, bad, log) -> tuple[int | None, int | None]:
    """The byte260 tokenizer file: JSON with vocab_size and config.bos_id; returns (vocab, bos)."""
    rel = f"tokenizers/{path.name}"
    if not path.is_file():
        bad(rel, "missing")
        return None, None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        vocab = int(payload["vocab_size"])
        bos = int((payload.get("config") or {}).get("bos_id", 1))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        bad(rel, f"not a pure-byte tokenizer description ({type(exc).__name__}: {exc})")
        return None, None
    if payload.get("tokenizer_type") not in (None, "pure_byte"):
        bad(rel, f"tokenizer_type {payload.get('tokenizer_type')!r}, expected 'pure_byte'")
        return None, None
    log(f"  ok   {path.name}: pure bytes, {vocab} ids")
    return vocab, bos


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check challenge shards, tokenizer and manifest hashes in a data folder."
    )
    parser.add_argument(
        "data_dir",
        nargs="?",
        default=os.environ.get("DATA_DIR") or str(Path(__file__).resolve().parent),
        help="folder holding datasets/ and tokenizers/ (default: $DATA_DIR, else this script's folder)",
    )
    parser.add_argument(
        "--variant", help="only this dataset, e.g. sp1024 or byte260 (default: every fineweb10B_* folder)"
    )
    parser.add_argument("--manifest", help="manifest to compare with (default DATA_DIR/manifest.json if present)")
    parser.add_argument("--no-hash", action="store_true", help="skip sha256 comparisons")
    parser.add_argument(
        "--check-tokens", action="store_true", help="read every token: ids < vocab size, val starts with BOS"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data_dir = Path(args.data_dir)
    datasets = data_dir / "datasets"
    if args.variant:
        if args.variant != BYTE_VARIANT and not re.fullmatch(r"sp[1-9][0-9]*", args.variant):
            raise DataToolError(f"--variant {args.variant!r}: expected sp<VOCAB> (e.g. sp1024) or {BYTE_VARIANT}")
        dirs = [datasets / f"fineweb10B_{args.variant}"]
        if not dirs[0].is_dir():
            raise DataToolError(f"{dirs[0]} does not exist")
    else:
        dirs = sorted(p for p in datasets.glob("fineweb10B_*") if p.is_dir()
                      and re.fullmatch(rf"fineweb10B_(sp[1-9][0-9]*|{BYTE_VARIANT})", p.name))
        if not dirs:
            raise DataToolError(
                f"no dataset folders (fineweb10B_sp<VOCAB> or fineweb10B_{BYTE_VARIANT}) under {datasets}"
            )
    manifest_path = Path(args.manifest) if args.manifest else data_dir / "manifest.json"
    if args.manifest and not manifest_path.is_file():
        raise DataToolError(f"--manifest {manifest_path}: no such file")
    manifest = load_manifest(manifest_path)
    if manifest:
        print(f"manifest: {manifest_path}")
    problems = sum(verify_dataset(data_dir, d, manifest, not args.no_hash, args.check_tokens, print) for d in dirs)
    print("all checks passed" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
