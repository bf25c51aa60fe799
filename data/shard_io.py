"""Shared helpers for the challenge's token shard format and the data tools' CLIs.

A shard (``fineweb_{train,val}_NNNNNN.bin``) is a 256 x int32 little-endian
header -- magic 20240520, version 1, token count -- followed by that many
little-endian uint16 token ids, so its size is exactly 1024 + 2 * count bytes.

Used by cached_challenge_fineweb.py, build_shards.py and verify_shards.py,
which import it from their own folder (Python puts a script's folder first on
sys.path).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
# Tokens are stored as uint16; the largest accepted vocabulary is 65,535 pieces
# (ids 0..65534), which always fits.
MAX_VOCAB_SIZE = 65_535
# The official pure-byte export: 4 special ids (pad 0, bos 1, eos 2, unk 3), then the 256 bytes.
BYTE_VARIANT = "byte260"
BYTE_TOKENIZER_FILE = "fineweb_pure_byte_260.json"


class DataToolError(Exception):
    """An expected failure with a message meant for the user (no traceback)."""


def dataset_dir_name(vocab_size: int) -> str:
    return f"fineweb10B_sp{vocab_size}"


def tokenizer_file_name(vocab_size: int) -> str:
    return f"fineweb_{vocab_size}_bpe.model"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def check_vocab_size(vocab_size: int, what: str) -> None:
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataToolError(
            f"{what}: vocabulary of {vocab_size:,} pieces is too large; shards store token ids "
            f"as uint16, so at most {MAX_VOCAB_SIZE:,} pieces are supported"
        )


def shard_problem(path: Path) -> str | None:
    """Return why ``path`` is not a complete, well-formed shard, or None if it is."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size < HEADER_BYTES:
        return f"truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header"
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        return f"bad magic {int(header[0])} (expected {SHARD_MAGIC})"
    if int(header[1]) != SHARD_VERSION:
        return f"unsupported version {int(header[1])} (expected {SHARD_VERSION})"
    count = int(header[2])
    if count < 0:
        return f"negative token count {count} in header"
    expected = HEADER_BYTES + TOKEN_BYTES * count
    if size != expected:
        kind = "truncated" if size < expected else "too long"
        return f"{kind}: {size:,} bytes, header says {count:,} tokens = {expected:,} bytes"
    return None


def shard_token_count(path: Path) -> int:
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")[2])


def read_shard_tokens(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (call shard_problem first)."""
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(shard_token_count(path),))


def shard_bytes(tokens: np.ndarray) -> tuple[bytes, bytes]:
    """Header bytes and token bytes for a shard holding ``tokens``."""
    if len(tokens) >= 2**31:
        raise DataToolError(f"shard of {len(tokens):,} tokens does not fit the int32 header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    return header.tobytes(), np.ascontiguousarray(tokens, dtype="<u2").tobytes()


def write_shard(path: Path, tokens: np.ndarray) -> tuple[int, str]:
    """Write a shard atomically (temp file + rename); return (bytes, sha256)."""
    header, body = shard_bytes(tokens)
    digest = hashlib.sha256(header)
    digest.update(body)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body)
    os.replace(tmp, path)
    return len(header) + len(body), digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a tool's main(); expected failures print one clear line, not a traceback."""
    prog = Path(sys.argv[0]).name
    try:
        return main(argv)
    except DataToolError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permission denied, unreadable input ...
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
