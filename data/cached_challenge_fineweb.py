"""Download the challenge's pre-tokenized FineWeb shards and tokenizer.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10

The dataset repo holds ``<root>/manifest.json`` (root = "datasets" by default),
which lists the datasets and tokenizers; for the chosen variant this script
fetches the tokenizer, the full validation split and the first N training
shards into the layout train_gpt.py reads:

    DATA/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin
    DATA/tokenizers/fineweb_1024_bpe.model

Variants, as in the official script: sp<VOCAB> (SentencePiece BPE; dataset
fineweb10B_sp<VOCAB>) and byte260 (pure bytes: ids 4..259 after 4 special ids;
dataset fineweb10B_byte260, tokenizer tokenizers/fineweb_pure_byte_260.json).
train_gpt.py reads sp<VOCAB> data; byte260 is fetched for other models.

The manifest is fetched on every run (a stale copy from another repo must not
be used). If that fails for lack of network and DATA/manifest.json exists from
an earlier run, that copy is used, with a warning; files already present are
then skipped as usual, and only missing ones need the network.

Resumable: a file already present and complete (valid shard header, size that
matches it) is skipped; a truncated or corrupt one is fetched again. Files are
written under a temporary name and renamed when complete.

Where files come from (the "fetch layer"):
  * --hub-dir PATH / $PG_HUB_DIR: a local folder laid out like the hub repo
    (PATH/<root>/manifest.json, PATH/<root>/datasets/..., ...). Offline use, tests.
  * otherwise huggingface_hub.hf_hub_download (pip install -r requirements.txt),
    repo --repo-id / $MATCHED_FINEWEB_REPO_ID (default willdepueoai/parameter-golf),
    root --remote-root / $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default "datasets").
    sp4096 and sp8192 are published in kevclark/parameter-golf.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from shard_io import (
    BYTE_TOKENIZER_FILE,
    BYTE_VARIANT,
    DataToolError,
    human_bytes,
    run_cli,
    sha256_file,
    shard_name,
    shard_problem,
    tokenizer_file_name,
)

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80  # 8B tokens at 100M tokens per shard, as the official script
# Variants published outside the default repo (used for a hint when one is missing).
OTHER_REPOS = {"sp4096": "kevclark/parameter-golf", "sp8192": "kevclark/parameter-golf"}
HF_INSTALL_HINT = (
    "huggingface_hub is not installed. Install the project's requirements with\n"
    "    pip install -r requirements.txt\n"
    "or point --hub-dir PATH (or $PG_HUB_DIR) at a local copy of the dataset repo."
)
# huggingface_hub errors that mean "not there" (wrong repo, root or file), not "no network".
_NOT_FOUND_ERRORS = {"EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
                     "DisabledRepoError", "HFValidationError"}
_OFFLINE_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}  # not cached and no network

# A fetcher copies one file, given by its path inside the hub repo (posix
# string, e.g. "datasets/manifest.json"), to a local destination path. It
# raises DataToolError when the file cannot be had (FetchError, with
# network=True, when the reason is that the hub cannot be reached).
Fetcher = Callable[[str, Path], None]


class FetchError(DataToolError):
    """A file could not be fetched; ``network`` says whether the hub was unreachable."""

    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


def is_network_failure(exc: BaseException) -> bool:
    """True unless the error says the repo, revision or file does not exist."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _OFFLINE_ERRORS:
        return True
    return not names & _NOT_FOUND_ERRORS


class LocalHubFetcher:
    """Copies files from a local folder that mirrors the hub repo's layout."""

    def __init__(self, hub_dir: Path):
        self.hub_dir = Path(hub_dir)
        if not self.hub_dir.is_dir():
            raise DataToolError(f"--hub-dir / PG_HUB_DIR: {self.hub_dir} is not a directory")

    def __call__(self, remote_path: str, destination: Path) -> None:
        source = self.hub_dir / remote_path
        if not source.is_file():
            raise DataToolError(f"{remote_path} not found in hub dir {self.hub_dir} (looked for {source})")
        # Copied, never hard-linked: an in-place edit of DATA must not reach the mirror.
        _place(source, destination, link=False)

    def __repr__(self) -> str:
        return f"hub dir {self.hub_dir}"


class HuggingFaceFetcher:
    """Downloads through huggingface_hub (its cache, then a link or copy into DATA)."""

    def __init__(self, repo_id: str):
        try:  # imported lazily: the module (and --hub-dir use) must work without it
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise DataToolError(HF_INSTALL_HINT) from None
        self.repo_id = repo_id
        self._download = hf_hub_download

    def __call__(self, remote_path: str, destination: Path, force: bool = False) -> None:
        path = PurePosixPath(remote_path)
        subfolder = path.parent.as_posix()
        try:
            cached = self._download(
                repo_id=self.repo_id,
                filename=path.name,
                subfolder=None if subfolder == "." else subfolder,
                repo_type="dataset",
                force_download=force,
            )
        except Exception as exc:  # network, auth, missing file: all reported the same way
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise FetchError(
                f"could not download {remote_path} from Hugging Face dataset repo {self.repo_id} "
                f"({type(exc).__name__}: {first_line}). Check the network connection, --repo-id and "
                f"--remote-root, or use --hub-dir PATH with a local copy.",
                network=is_network_failure(exc),
            ) from None
        # The hub cache may hand back a snapshot symlink: resolve it to the blob, and
        # hard-link it (as the official script does) so a shard is not stored twice.
        _place(Path(cached).resolve(strict=True), destination, link=True)

    def refetch(self, remote_path: str, destination: Path) -> None:
        """Download again, bypassing a hub cache entry that turned out to be bad."""
        destination.unlink(missing_ok=True)  # drop the link to the bad blob first
        self(remote_path, destination, force=True)

    def __repr__(self) -> str:
        return f"Hugging Face dataset repo {self.repo_id}"


def _place(source: Path, destination: Path, link: bool) -> None:
    """Put ``source`` at ``destination`` atomically: a hard link if asked and possible,
    else a copy to a temporary name, renamed once complete."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        if not link:
            raise OSError
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def make_fetcher(hub_dir: str | None, repo_id: str) -> Fetcher:
    return LocalHubFetcher(Path(hub_dir)) if hub_dir else HuggingFaceFetcher(repo_id)


# ----------------------------------------------------------------------------- manifest


def remote(remote_root: str, relative: str) -> str:
    return f"{remote_root.strip('/')}/{relative}" if remote_root.strip("/") else relative


def safe_relative(value: object, what: str) -> str:
    """A manifest path must stay inside the data folder."""
    path = PurePosixPath(str(value))
    if not str(value) or path.is_absolute() or ".." in path.parts:
        raise DataToolError(f"manifest.json: {what} has an unsafe path {value!r}")
    return path.as_posix()


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_manifest(
    data_dir: Path, fetcher: Fetcher | None, remote_root: str, warn: Callable[[str], None] = to_stderr
) -> dict:
    """Fetch manifest.json (always, so a stale copy from another repo is never used)
    unless fetcher is None, in which case the local copy DATA/manifest.json is read.
    Without network, an existing local copy (from an earlier run) is used with a warning."""
    path = data_dir / "manifest.json"
    if fetcher is not None:
        try:
            fetcher(remote(remote_root, "manifest.json"), path)
        except DataToolError as exc:
            if not path.is_file():
                raise
            if not getattr(exc, "network", False):
                raise DataToolError(f"{exc}\n(a local manifest exists at {path}: --skip-manifest uses it)") from None
            warn(
                f"warning: {exc}\nwarning: the hub cannot be reached; using the local manifest {path} "
                "from an earlier run (it may be out of date; files already present are skipped as usual)",
            )
    elif not path.is_file():
        raise DataToolError(f"--skip-manifest: no local manifest at {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataToolError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), list):
        raise DataToolError(f"{path} has no 'datasets' list; is it a parameter-golf manifest?")
    return manifest


@dataclass
class Item:
    """One file to fetch: its path under the remote root (= its path under DATA)."""

    relative: str
    kind: str  # "shard" or "file"
    expected_bytes: int | None = None
    sha256: str | None = None


def plan(manifest: dict, variant: str, train_shards: int, repo_label: str, with_docs: bool = False) -> list[Item]:
    """The files to fetch for ``variant``, from the manifest's fields as the official
    script reads them: datasets[].name / stats.files_val / stats.files_train /
    tokenizer_name, and tokenizers[].name / model_path / vocab_path / path."""
    dataset_name = dataset_dir_for_variant(variant)
    datasets = [d for d in manifest["datasets"] if isinstance(d, dict)]
    entry = next((d for d in datasets if d.get("name") == dataset_name), None)
    if entry is None:
        available = ", ".join(sorted(str(d.get("name", "?")).removeprefix("fineweb10B_") for d in datasets))
        hint = ""
        if variant in OTHER_REPOS:
            hint = f"; {variant} is published in {OTHER_REPOS[variant]}: pass --repo-id {OTHER_REPOS[variant]}"
        raise DataToolError(
            f"variant {variant} ({dataset_name}) is not in the manifest of {repo_label} "
            f"(available: {available or 'none'}){hint}"
        )
    stats = entry.get("stats") or {}
    try:
        files_val, files_train = int(stats["files_val"]), int(stats["files_train"])
    except (KeyError, TypeError, ValueError):
        raise DataToolError(f"manifest.json: {dataset_name} lacks stats.files_val / stats.files_train") from None
    if train_shards > files_train:
        raise DataToolError(
            f"--train-shards {train_shards}: {variant} has only {files_train} training shards in {repo_label}"
        )
    tokenizer_name = entry.get("tokenizer_name")
    tokenizer = next(
        (t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tokenizer_name), None
    )
    if tokenizer is None:
        raise DataToolError(f"manifest.json: tokenizer {tokenizer_name!r} of {dataset_name} is not listed")
    artifacts = [tokenizer[k] for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    if not artifacts:
        raise DataToolError(f"manifest.json: tokenizer {tokenizer_name!r} lists no model_path/vocab_path/path")

    # Optional per-file sizes and hashes (written by build_shards.py; the official
    # manifest has none, then shard headers alone decide whether a file is complete).
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}

    def item(relative: str, kind: str) -> Item:
        relative = safe_relative(relative, relative)
        info = files.get(relative) or {}
        return Item(relative, kind, info.get("bytes"), info.get("sha256"))

    items = []
    if with_docs:
        items += [item("docs_selected.jsonl", "file"), item("docs_selected.source_manifest.json", "file")]
    shard_dir = f"datasets/{dataset_name}"
    items += [item(f"{shard_dir}/{shard_name('val', i)}", "shard") for i in range(files_val)]
    items += [item(f"{shard_dir}/{shard_name('train', i)}", "shard") for i in range(train_shards)]
    items += [item(safe_relative(a, f"tokenizer {tokenizer_name}"), "file") for a in artifacts]
    return items


# ----------------------------------------------------------------------------- download


def local_problem(path: Path, item: Item) -> str | None:
    """Why the local copy must be (re)fetched, or None if it is complete."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if item.expected_bytes is not None and size != int(item.expected_bytes):
        return f"size {size:,} bytes, manifest says {int(item.expected_bytes):,}"
    if item.kind == "shard":
        return shard_problem(path)
    return "empty" if size == 0 else None


def dataset_dir_for_variant(variant: str) -> str:
    """The dataset folder of a variant, as the official script names it."""
    return f"fineweb10B_{variant}"


def expected_tokenizer(variant: str) -> str:
    """Where the variant's tokenizer lives under DATA (where train_gpt.py looks for sp<VOCAB>)."""
    if variant == BYTE_VARIANT:
        return f"tokenizers/{BYTE_TOKENIZER_FILE}"
    return f"tokenizers/{tokenizer_file_name(int(variant[2:]))}"


def check_args(variant: str, train_shards: int) -> None:
    if variant != BYTE_VARIANT and not re.fullmatch(r"sp[1-9][0-9]*", variant):
        raise DataToolError(
            f"--variant {variant!r} is not supported: expected sp<VOCAB> (e.g. sp1024, sp4096, sp8192) "
            f"or {BYTE_VARIANT}"
        )
    if train_shards < 0:
        raise DataToolError(f"--train-shards must be >= 0, got {train_shards}")


def download(
    variant: str,
    train_shards: int,
    data_dir: Path,
    fetcher: Fetcher,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    *,
    skip_manifest: bool = False,
    with_docs: bool = False,
    verify: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = to_stderr,
) -> dict[str, int]:
    """Fetch what ``variant`` needs into ``data_dir``; return counts of fetched/skipped files."""
    check_args(variant, train_shards)
    data_dir = Path(data_dir)
    label = repr(fetcher)
    log(f"source: {label}, root {remote_root or '(repo root)'!r}; destination: {data_dir}")
    manifest = load_manifest(data_dir, None if skip_manifest else fetcher, remote_root, warn)
    items = plan(manifest, variant, train_shards, label, with_docs)

    tokenizer = expected_tokenizer(variant)
    if tokenizer not in {i.relative for i in items}:
        where = "the official layout" if variant == BYTE_VARIANT else "where train_gpt.py looks for it"
        log(f"note: the manifest's tokenizer is not at {tokenizer}, {where}")
    if variant == BYTE_VARIANT:
        log(f"note: {variant} is pure-byte data; train_gpt.py reads sp<VOCAB> data (fineweb10B_sp<VOCAB>)")

    counts = {"fetched": 0, "skipped": 0, "bytes_fetched": 0}
    width = len(str(len(items)))
    start = time.time()
    for n, item in enumerate(items, 1):
        path = data_dir / item.relative
        tag = f"[{n:>{width}}/{len(items)}] {item.relative}"
        problem = local_problem(path, item)
        if problem is None:
            counts["skipped"] += 1
            log(f"{tag}: present, skipped")
            continue
        if problem != "missing":
            log(f"{tag}: local copy is incomplete or corrupt ({problem}); fetching again")
        t0 = time.time()
        fetcher(remote(remote_root, item.relative), path)
        problem = local_problem(path, item)
        if problem is not None and hasattr(fetcher, "refetch"):
            log(f"{tag}: the cached download is bad ({problem}); downloading it again")
            fetcher.refetch(remote(remote_root, item.relative), path)
            problem = local_problem(path, item)
        if problem is not None:
            raise DataToolError(f"{item.relative} fetched from {label} is itself bad: {problem}")
        size = path.stat().st_size
        counts["fetched"] += 1
        counts["bytes_fetched"] += size
        log(f"{tag}: fetched {human_bytes(size)} in {time.time() - t0:.1f}s")

    if verify:
        verify_hashes(data_dir, items, log)
    log(
        f"done: {counts['fetched']} fetched ({human_bytes(counts['bytes_fetched'])}), "
        f"{counts['skipped']} already present, in {time.time() - start:.1f}s -> {data_dir}"
    )
    return counts


def verify_hashes(data_dir: Path, items: list[Item], log: Callable[[str], None]) -> None:
    """--verify: compare sha256 where the manifest gives one (headers were checked already)."""
    hashed = [i for i in items if i.sha256]
    if not hashed:
        log("verify: shard headers and sizes are valid; the manifest lists no sha256 to compare")
        return
    bad = [i.relative for i in hashed if sha256_file(data_dir / i.relative) != i.sha256]
    if bad:
        raise DataToolError(f"sha256 mismatch for {', '.join(bad)}; delete them and rerun")
    log(f"verify: sha256 of {len(hashed)} files matches the manifest")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        description="Download the challenge's tokenized FineWeb shards and tokenizer (resumable).",
        epilog="sp4096 and sp8192 are published in kevclark/parameter-golf: add --repo-id kevclark/parameter-golf.",
    )
    parser.add_argument("train_shards_positional", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--variant", default="sp1024", help="sp<VOCAB> (sp1024, sp4096, sp8192) or byte260 (default sp1024)"
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        metavar="N",
        help=f"training shards to fetch, 100M tokens each (default {DEFAULT_TRAIN_SHARDS}); "
        "validation is always complete",
    )
    parser.add_argument(
        "--repo-id",
        default=env.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
        help="Hugging Face dataset repo (env MATCHED_FINEWEB_REPO_ID; default %(default)s)",
    )
    parser.add_argument(
        "--remote-root",
        default=env.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT),
        help="folder inside the repo holding manifest.json "
        "(env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX; default %(default)r)",
    )
    parser.add_argument(
        "--hub-dir",
        default=env.get("PG_HUB_DIR") or None,
        metavar="PATH",
        help="local folder mirroring the repo layout, used instead of Hugging Face (env PG_HUB_DIR)",
    )
    parser.add_argument(
        "--data-dir",
        default=env.get("DATA_DIR") or str(Path(__file__).resolve().parent),
        metavar="PATH",
        help="where to put datasets/ and tokenizers/ (env DATA_DIR; default: this script's folder, data/)",
    )
    parser.add_argument("--skip-manifest", action="store_true", help="use DATA/manifest.json as is, do not fetch it")
    parser.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its sidecar")
    parser.add_argument("--verify", action="store_true", help="also compare sha256 where the manifest lists them")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    train_shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    check_args(args.variant, train_shards)  # before the fetcher: a typo must not ask for huggingface_hub
    fetcher = make_fetcher(args.hub_dir, args.repo_id)
    download(
        args.variant,
        train_shards,
        Path(args.data_dir),
        fetcher,
        args.remote_root,
        skip_manifest=args.skip_manifest,
        with_docs=args.with_docs,
        verify=args.verify,
        log=lambda line: print(line, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
