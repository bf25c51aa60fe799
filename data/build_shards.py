"""Build challenge-format token shards (and optionally the tokenizer) from raw text.

One corpus, the first N documents to validation:

    python data/build_shards.py --input corpus.jsonl.xz --num-val-docs 50000 --vocab-size 4096 --out OUT

Separate validation and training documents, reusing an existing tokenizer:

    python data/build_shards.py --val-docs val.jsonl.xz --train-docs train.jsonl.xz \\
        --tokenizer fineweb_4096_bpe.model --out OUT

Inputs: JSONL files with a "text" field per line (optionally .gz / .xz), plain
text files (one document per file), or directories of either (read recursively,
in sorted path order; hidden files are ignored). Bad lines -- blank, invalid
JSON, not UTF-8, no "text" string, empty text -- are counted and reported,
never fatal.

Output (OUT can be passed to train_gpt.py as DATA_DIR):

    OUT/datasets/fineweb10B_sp{V}/fineweb_val_000000.bin ...    (validation first)
    OUT/datasets/fineweb10B_sp{V}/fineweb_train_000000.bin ...
    OUT/tokenizers/fineweb_{V}_bpe.model (+ .vocab)
    OUT/manifest.json   doc/token counts per split, bad-line counts, sha256 of inputs and outputs

Each document is written as BOS followed by its tokens; documents are packed in
input order into shards of --shard-tokens tokens (a document may continue in
the next shard, as in the official export). Same inputs and options give the
same bytes. With separate files and a large enough --shard-tokens the shards
are byte-identical to prep_shards.py in the bench folder.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import queue
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from shard_io import (
    MAX_VOCAB_SIZE,
    DataToolError,
    check_vocab_size,
    dataset_dir_name,
    human_bytes,
    run_cli,
    sha256_file,
    shard_name,
    tokenizer_file_name,
    write_shard,
)

DEFAULT_SHARD_TOKENS = 100_000_000  # the challenge's shard size
DEFAULT_NUM_VAL_DOCS = 50_000  # the challenge's validation split size
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")
BAD_KINDS = ("blank_line", "invalid_json", "not_utf8", "missing_text", "empty_text")

# SentencePiece trainer settings of the official exporter
# (data/download_hf_docs_and_tokenize.py in openai/parameter-golf).
CHALLENGE_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}

Log = Callable[[str], None]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def import_sentencepiece():
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataToolError("sentencepiece is required: python -m pip install sentencepiece") from None
    return spm


# ----------------------------------------------------------------------------- reading documents


@dataclass
class Source:
    """One input file; ``given`` is the command-line path it came from."""

    path: Path
    given: str
    jsonl: bool


@dataclass
class InputStats:
    given: str
    split: str
    docs: int = 0
    bad: Counter = field(default_factory=Counter)


def open_maybe_compressed(path: Path):
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def expand_inputs(given_paths: list[str], flag: str) -> list[Source]:
    """Files named on the command line, directories expanded in sorted path order."""
    sources = []
    for given in given_paths:
        path = Path(given)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            visible = (
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files = sorted(visible, key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise DataToolError(f"{flag} {given}: directory contains no files")
        else:
            raise DataToolError(f"{flag} {given}: no such file or directory")
        sources += [Source(f, given, f.name.lower().endswith(JSONL_SUFFIXES)) for f in files]
    return sources


def check_text(text: str, stats: InputStats) -> str | None:
    """Return the text if usable; otherwise count why not and return None."""
    if not text.strip():
        stats.bad["empty_text"] += 1
        return None
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
        stats.bad["not_utf8"] += 1
        return None
    return text


def iter_source(source: Source, stats: InputStats) -> Iterator[str]:
    """Yield the usable documents of one file, counting bad lines into ``stats``."""
    try:
        with open_maybe_compressed(source.path) as f:
            if not source.jsonl:  # one document per file
                try:
                    text = f.read().decode("utf-8").removeprefix("\ufeff")
                except UnicodeDecodeError:
                    stats.bad["not_utf8"] += 1
                    return
                if check_text(text, stats) is not None:
                    yield text
                return
            for raw in f:
                if not raw.strip():
                    stats.bad["blank_line"] += 1
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.bad["not_utf8"] += 1
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    stats.bad["invalid_json"] += 1
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    stats.bad["missing_text"] += 1
                    continue
                if check_text(text, stats) is not None:
                    yield text
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as exc:
        raise DataToolError(f"cannot read {source.path}: {exc}") from None


@dataclass
class Plan:
    """Which documents go where: either ``mixed`` sources whose first ``num_val_docs``
    usable documents are validation, or separate ``val`` and ``train`` sources."""

    mixed: list[Source]
    val: list[Source]
    train: list[Source]
    num_val_docs: int

    def stats_template(self) -> list[InputStats]:
        stats, seen = [], set()
        for split, sources in (("mixed", self.mixed), ("val", self.val), ("train", self.train)):
            for s in sources:
                if (split, s.given) not in seen:
                    seen.add((split, s.given))
                    stats.append(InputStats(s.given, split))
        return stats


def iter_split_docs(plan: Plan, stats: list[InputStats]) -> Iterator[tuple[str, str]]:
    """Yield (split, text) for every usable document, in output order."""
    by_key = {(s.split, s.given): s for s in stats}

    def docs(split: str, sources: list[Source]) -> Iterator[str]:
        for source in sources:
            st = by_key[(split, source.given)]
            for text in iter_source(source, st):
                st.docs += 1
                yield text

    n = 0
    for text in docs("mixed", plan.mixed):
        yield ("val" if n < plan.num_val_docs else "train"), text
        n += 1
    for split in ("val", "train"):
        for text in docs(split, getattr(plan, split)):
            yield split, text


def iter_training_texts(plan: Plan) -> Iterator[str]:
    """The training split's documents (for the tokenizer; validation is never used)."""
    scratch = plan.stats_template()  # bad lines are counted in the encoding pass
    for split, text in iter_split_docs(plan, scratch):
        if split == "train":
            yield text


def batched(docs: Iterator[tuple[str, str]], max_docs: int, max_chars: int) -> Iterator[tuple[str, list[str], int]]:
    """Group consecutive same-split documents into (split, texts, characters) batches."""
    split, texts, chars = None, [], 0
    for doc_split, text in docs:
        if texts and (doc_split != split or len(texts) >= max_docs or chars >= max_chars):
            yield split, texts, chars
            texts, chars = [], 0
        split = doc_split
        texts.append(text)
        chars += len(text)
    if texts:
        yield split, texts, chars


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread (decompression and JSON parsing overlap
    the encoder, which releases the GIL); exceptions are re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():  # give up once the consumer has gone away
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def worker():
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer
            put((done, exc))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()


def hash_input(given: str) -> dict:
    """sha256 and size of an input file; for a directory, a digest over its files' paths and hashes."""
    path = Path(given)
    if path.is_file():
        return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    digest, total, count = hashlib.sha256(), 0, 0
    for source in expand_inputs([given], "input"):
        rel = source.path.relative_to(path).as_posix()
        digest.update(f"{rel}\0{sha256_file(source.path)}\n".encode())
        total += source.path.stat().st_size
        count += 1
    return {"bytes": total, "files": count, "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------- tokenizer


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DataToolError(f"--trainer-override {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)  # numbers, true/false
    except json.JSONDecodeError:
        return key, value


def train_tokenizer(
    plan: Plan,
    vocab_size: int,
    threads: int,
    max_docs: int | None,
    max_bytes: int | None,
    overrides: dict,
    verbose: bool,
    log: Log,
) -> tuple[bytes, dict]:
    """Train the challenge's SentencePiece BPE on the training documents; return the
    model bytes and a record of what it was trained on."""
    spm = import_sentencepiece()
    settings = {**CHALLENGE_TRAINER_SETTINGS, "vocab_size": vocab_size, **overrides}
    max_len = int(settings.get("max_sentence_length", 4192))  # sentencepiece's default
    used = {"docs": 0, "text_bytes": 0, "docs_over_max_sentence_length": 0}
    last_report = [time.time()]
    read_errors: list[DataToolError] = []  # raised here, not inside SentencePiece's C++ loop

    def sentences() -> Iterator[str]:
        try:
            yield from training_sentences()
        except DataToolError as exc:
            read_errors.append(exc)

    def training_sentences() -> Iterator[str]:
        # As the official exporter: NULs become spaces, surrounding space is stripped.
        for text in iter_training_texts(plan):
            if time.time() - last_report[0] >= 5:
                last_report[0] = time.time()
                log(f"  read {used['docs']:,} docs ({human_bytes(used['text_bytes'])}) for the tokenizer")
            if max_docs is not None and used["docs"] >= max_docs:
                return
            if max_bytes is not None and used["text_bytes"] >= max_bytes:
                return
            text = text.replace("\x00", " ").strip()
            if not text:
                continue
            size = len(text.encode("utf-8"))
            used["docs"] += 1
            used["text_bytes"] += size
            used["docs_over_max_sentence_length"] += size > max_len
            yield text

    limit = []
    if max_docs is not None:
        limit.append(f"first {max_docs:,} docs")
    if max_bytes is not None:
        limit.append(f"first {human_bytes(max_bytes)}")
    log(
        f"training a {vocab_size}-piece SentencePiece BPE on the training docs"
        f"{' (' + ', '.join(limit) + ')' if limit else ''} with {threads} threads"
        f"{'' if verbose else ' (--verbose shows the trainer log)'} ..."
    )
    t0 = time.time()
    spm.set_random_generator_seed(0)  # the trainer only samples when input_sentence_size is set
    model = io.BytesIO()  # model_writer: no model_prefix (an output path) is recorded in the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            num_threads=threads,
            minloglevel=0 if verbose else 1,
            **settings,
        )
    except RuntimeError as exc:  # sentencepiece reports bad settings / too small corpora this way
        if read_errors:
            raise read_errors[0] from None
        if used["docs"] == 0:
            where = "every usable doc went to validation; lower --num-val-docs" if plan.mixed else "check --train-docs"
            raise DataToolError(f"no training documents to train the tokenizer on ({where})") from None
        raise DataToolError(f"SentencePiece training failed: {str(exc).strip()}") from None
    if read_errors:
        raise read_errors[0]
    seconds = time.time() - t0
    log(
        f"tokenizer trained in {seconds:.1f}s on {used['docs']:,} docs ({human_bytes(used['text_bytes'])} of text)"
    )
    if used["docs_over_max_sentence_length"]:
        log(
            f"note: {used['docs_over_max_sentence_length']:,} of these docs are longer than max_sentence_length="
            f"{max_len} bytes and were skipped by the trainer, as in the official exporter "
            f"(--trainer-override max_sentence_length=N to keep them)"
        )
    record = {"trained_on": used, "settings": settings}
    return model.getvalue(), record


def vocab_text(sp) -> str:
    """The .vocab file SentencePiece writes next to a model: piece<TAB>score per line."""
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- shards


class ShardWriter:
    """Packs one split's tokens into fixed-size shards, written as they fill."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, files: dict, rel_dir: str):
        self.out_dir, self.split, self.rel_dir = out_dir, split, rel_dir
        self.buf = np.empty(shard_tokens, dtype=np.uint16)  # pages are touched only as filled
        self.fill = 0
        self.files = files  # manifest "files" entries, shared by both splits
        self.shards = 0
        self.docs = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, docs: int) -> None:
        self.docs += docs
        self.tokens += len(tokens)
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buf) - self.fill, len(tokens) - pos)
            self.buf[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = shard_name(self.split, self.shards)
        size, digest = write_shard(self.out_dir / name, self.buf[: self.fill])
        self.files[f"{self.rel_dir}/{name}"] = {"bytes": size, "sha256": digest, "tokens": self.fill}
        self.shards += 1
        self.fill = 0


def encode_batch(sp, texts: list[str], bos: int, vocab_size: int, threads: int) -> np.ndarray:
    """BOS + tokens for each text, concatenated, as uint16."""
    ids = sp.encode(texts, out_type=int, num_threads=threads)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise DataToolError(f"tokenizer produced id {int(flat.max())} outside its vocabulary of {vocab_size}")
    out = np.empty(flat.size + len(ids), dtype=np.uint16)
    bos_at = np.cumsum(lengths + 1) - (lengths + 1)
    is_token = np.ones(out.size, dtype=bool)
    is_token[bos_at] = False
    out[bos_at] = bos
    out[is_token] = flat
    return out


def write_shards(
    plan: Plan,
    sp,
    dataset_dir: Path,
    rel_dir: str,
    shard_tokens: int,
    threads: int,
    batch_docs: int,
    stats: list[InputStats],
    files: dict,
    log: Log,
) -> dict[str, ShardWriter]:
    writers = {s: ShardWriter(dataset_dir, s, shard_tokens, files, rel_dir) for s in ("val", "train")}
    bos, vocab_size = sp.bos_id(), sp.get_piece_size()
    t0 = last = time.time()
    text_done = 0
    current = None
    batches = batched(iter_split_docs(plan, stats), batch_docs, 16 << 20)
    for split, texts, size in prefetch(batches):
        if split != current:
            if current is not None:
                writers[current].flush()  # the validation split ends in its own shard
            current = split
        writers[split].add(encode_batch(sp, texts, bos, vocab_size, threads), len(texts))
        text_done += size
        if time.time() - last >= 5:
            last = time.time()
            w = writers[split]
            log(
                f"  {split}: {w.docs:,} docs, {w.tokens:,} tokens, {w.shards} shards written "
                f"({text_done / 1e6 / (last - t0):.1f} M chars/s)"
            )
    for w in writers.values():
        w.flush()
    return writers


def remove_stale_shards(dataset_dir: Path, log: Log) -> None:
    stale = [p for pattern in ("fineweb_train_*.bin*", "fineweb_val_*.bin*") for p in dataset_dir.glob(pattern)]
    for p in stale:
        p.unlink()
    if stale:
        log(f"removed {len(stale)} shards of an earlier build from {dataset_dir}")


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build challenge-format token shards (and a tokenizer) from JSONL or text documents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1].split("Inputs:")[0].rstrip(),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output root (usable as DATA_DIR)")
    src = p.add_argument_group("documents (either --input, or --val-docs and --train-docs)")
    src.add_argument(
        "--input", nargs="+", metavar="PATH",
        help="corpus files/directories; the first --num-val-docs docs are validation"
    )
    src.add_argument(
        "--num-val-docs", type=int, metavar="N",
        help=f"validation docs taken from --input (default {DEFAULT_NUM_VAL_DOCS:,})"
    )
    src.add_argument("--val-docs", nargs="+", metavar="PATH", help="validation documents")
    src.add_argument("--train-docs", nargs="+", metavar="PATH", help="training documents")
    tok = p.add_argument_group("tokenizer (train one with --vocab-size, or reuse one with --tokenizer)")
    tok.add_argument(
        "--vocab-size", type=int, metavar="V", help=f"pieces of the tokenizer to train (at most {MAX_VOCAB_SIZE:,})"
    )
    tok.add_argument("--tokenizer", metavar="MODEL", help="reuse this SentencePiece .model instead of training one")
    tok.add_argument(
        "--tokenizer-train-docs", type=int, metavar="N", help="train the tokenizer on the first N training docs only"
    )
    tok.add_argument(
        "--tokenizer-train-bytes", type=float, metavar="B",
        help="... or on about the first B bytes of training text (e.g. 2e7)"
    )
    tok.add_argument(
        "--trainer-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra/changed SentencePiece trainer setting (repeatable)",
    )
    tok.add_argument("--tokenizer-only", action="store_true", help="stop after training the tokenizer")
    p.add_argument(
        "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
        help="tokens per shard (default %(default)s)"
    )
    p.add_argument(
        "--threads", type=int, default=cpu_count(), metavar="N",
        help="encoder/trainer threads (default: all cores, %(default)s)"
    )
    p.add_argument(
        "--batch-docs", type=int, default=1024, metavar="N", help="documents per encoder call (default %(default)s)"
    )
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's trainer log")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    if args.input and (args.val_docs or args.train_docs):
        raise DataToolError("use either --input, or --val-docs with --train-docs, not both")
    if args.input:
        n = DEFAULT_NUM_VAL_DOCS if args.num_val_docs is None else args.num_val_docs
        if n < 0:
            raise DataToolError(f"--num-val-docs must be >= 0, got {n}")
        return Plan(expand_inputs(args.input, "--input"), [], [], n)
    if args.num_val_docs is not None:
        raise DataToolError("--num-val-docs applies to --input; with --val-docs every listed doc is validation")
    if not args.train_docs or not (args.val_docs or args.tokenizer_only):
        raise DataToolError("give --input, or both --val-docs and --train-docs")
    return Plan([], expand_inputs(args.val_docs or [], "--val-docs"), expand_inputs(args.train_docs, "--train-docs"), 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log: Log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.time()

    # --- check everything cheap before any slow work
    if args.tokenizer is None and args.vocab_size is None:
        raise DataToolError("give --vocab-size V to train a tokenizer, or --tokenizer MODEL to reuse one")
    if args.vocab_size is not None:
        check_vocab_size(args.vocab_size, f"--vocab-size {args.vocab_size}")
        if args.vocab_size < 1:
            raise DataToolError(f"--vocab-size must be positive, got {args.vocab_size}")
    positive = (("--shard-tokens", args.shard_tokens), ("--threads", args.threads), ("--batch-docs", args.batch_docs))
    for flag, value in positive:
        if value < 1:
            raise DataToolError(f"{flag} must be >= 1, got {value}")
    if args.shard_tokens >= 2**31:
        raise DataToolError(f"--shard-tokens {args.shard_tokens} does not fit the shard header's int32 count")
    overrides = dict(parse_override(o) for o in args.trainer_override)
    plan = make_plan(args)
    spm = import_sentencepiece()
    out = Path(args.out)

    # --- tokenizer: reuse or train
    tokenizer_record: dict
    if args.tokenizer:
        model_path = Path(args.tokenizer)
        if not model_path.is_file():
            raise DataToolError(f"--tokenizer {model_path}: no such file")
        model_bytes = model_path.read_bytes()
        tokenizer_record = {"reused": model_path.name, "sha256": hashlib.sha256(model_bytes).hexdigest()}
    else:
        max_bytes = None if args.tokenizer_train_bytes is None else int(args.tokenizer_train_bytes)
        model_bytes, tokenizer_record = train_tokenizer(
            plan, args.vocab_size, args.threads, args.tokenizer_train_docs, max_bytes, overrides, args.verbose, log
        )
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError:
        raise DataToolError(f"--tokenizer {args.tokenizer}: not a SentencePiece model") from None
    vocab = sp.get_piece_size()
    check_vocab_size(vocab, f"tokenizer {args.tokenizer or ''}".strip())
    if args.tokenizer and args.vocab_size is not None and args.vocab_size != vocab:
        raise DataToolError(
            f"--vocab-size {args.vocab_size} does not match --tokenizer {args.tokenizer} ({vocab} pieces)"
        )
    if sp.bos_id() < 0:
        raise DataToolError(f"tokenizer {args.tokenizer or ''} has no BOS piece; shards need one per document")
    # Files are named after the requested size (as the official exporter does); a
    # trained model may come out smaller because hard_vocab_limit is off.
    name_vocab = args.vocab_size if args.vocab_size is not None else vocab
    if vocab != name_vocab:
        log(f"warning: the corpus gave only {vocab} pieces, fewer than --vocab-size {name_vocab}")

    tok_dir = out / "tokenizers"
    tok_dir.mkdir(parents=True, exist_ok=True)
    model_rel = f"tokenizers/{tokenizer_file_name(name_vocab)}"
    vocab_rel = model_rel.removesuffix(".model") + ".vocab"
    source_vocab = Path(args.tokenizer).with_suffix(".vocab") if args.tokenizer else None
    write_bytes_atomic(out / model_rel, model_bytes)
    if source_vocab is not None and source_vocab.is_file():
        shutil.copyfile(source_vocab, out / vocab_rel)
    else:
        write_bytes_atomic(out / vocab_rel, vocab_text(sp).encode("utf-8"))
    log(f"tokenizer: {out / model_rel} ({vocab} pieces)")
    if args.tokenizer_only:
        log(f"done in {time.time() - started:.1f}s (--tokenizer-only)")
        return 0

    # --- shards
    rel_dir = f"datasets/{dataset_dir_name(name_vocab)}"
    dataset_dir = out / rel_dir
    dataset_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(dataset_dir, log)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: it marks a complete build
    stats = plan.stats_template()
    files: dict[str, dict] = {}
    log(f"encoding with {args.threads} threads into {dataset_dir} ({args.shard_tokens:,} tokens per shard) ...")
    t0 = time.time()
    writers = write_shards(
        plan, sp, dataset_dir, rel_dir, args.shard_tokens, args.threads, args.batch_docs, stats, files, log
    )
    encode_seconds = time.time() - t0

    bad_total = Counter()
    for st in stats:
        bad_total.update(st.bad)
        if st.bad:
            detail = ", ".join(f"{k} {st.bad[k]:,}" for k in BAD_KINDS if st.bad[k])
            log(f"bad lines in {st.given}: {detail} (skipped)")
    val, train = writers["val"], writers["train"]
    if train.docs == 0:
        why = "every usable doc went to validation; lower --num-val-docs" if plan.mixed else "--train-docs has none"
        raise DataToolError(f"no training documents: {why}")
    if val.docs == 0:
        log("warning: the validation split is empty")
    if plan.mixed and val.docs < plan.num_val_docs:
        log(f"warning: only {val.docs:,} docs for validation, fewer than --num-val-docs {plan.num_val_docs:,}")

    # --- manifest (the official exporter's fields, plus sizes and hashes)
    for rel in (model_rel, vocab_rel):
        files[rel] = {"bytes": (out / rel).stat().st_size, "sha256": sha256_file(out / rel)}
    tokenizer_name = f"sp_bpe_{name_vocab}"
    split_stats = {
        "docs_total": val.docs + train.docs,
        "docs_val": val.docs,
        "docs_train": train.docs,
        "files_total": val.shards + train.shards,
        "files_val": val.shards,
        "files_train": train.shards,
        "tokens_total": val.tokens + train.tokens,
        "tokens_val": val.tokens,
        "tokens_train": train.tokens,
    }
    manifest = {
        "generator": "data/build_shards.py",
        "num_docs": val.docs + train.docs,
        "num_val_docs": val.docs,
        "shard_size": args.shard_tokens,
        "append_eos": False,
        "bad_lines": {k: bad_total[k] for k in BAD_KINDS},
        "inputs": [
            {
                "split": st.split,
                "path": st.given,
                **hash_input(st.given),
                "docs": st.docs,
                "bad_lines": {k: st.bad[k] for k in BAD_KINDS if st.bad[k]},
            }
            for st in stats
        ],
        "tokenizer_build": tokenizer_record,
        "tokenizers": [
            {
                "name": tokenizer_name,
                "kind": "sentencepiece_bpe",
                "vocab_size": vocab,
                "bos_id": sp.bos_id(),
                "eos_id": sp.eos_id(),
                "model_path": model_rel,
                "vocab_path": vocab_rel,
            }
        ],
        "datasets": [
            {
                "name": dataset_dir_name(name_vocab),
                "tokenizer_name": tokenizer_name,
                "tokenizer_kind": "sentencepiece_bpe",
                "path": rel_dir,
                "train_glob": f"{rel_dir}/fineweb_train_*.bin",
                "val_glob": f"{rel_dir}/fineweb_val_*.bin",
                "vocab_size": vocab,
                "bos_id": sp.bos_id(),
                "eos_id": sp.eos_id(),
                "stats": split_stats,
            }
        ],
        "files": dict(sorted(files.items())),
    }
    write_bytes_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    for split, w in (("val:  ", val), ("train:", train)):
        log(f"{split} {w.docs:,} docs, {w.tokens:,} tokens, {w.shards} shard{'s' * (w.shards != 1)}")
    if sum(bad_total.values()):
        log(f"skipped {sum(bad_total.values()):,} bad lines/files in total (see above and manifest.json)")
    log(f"encoding took {encode_seconds:.1f}s; done in {time.time() - started:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
