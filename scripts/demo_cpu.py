#!/usr/bin/env python3
"""The whole pipeline on a CPU in about two minutes: no download, no GPU.

    python3 scripts/demo_cpu.py                       # the repository's own text as the corpus
    python3 scripts/demo_cpu.py --text my_corpus.txt  # or your own (.txt or .jsonl)
    python3 scripts/demo_cpu.py --workdir demo_run    # keep the data, log and artifact

Steps:
  1. dataset: documents from the text this repository ships (its tracked Markdown and Python
     files, logs/ excluded), or from --text PATH (.txt: documents separated by blank lines;
     .jsonl: one {"text": ...} per line). Every 10th document is validation, the rest training
     (validation documents are never trained on; one that repeats a training document verbatim
     is dropped). data/build_shards.py trains a small SentencePiece BPE on the training documents
     (the challenge's trainer settings, byte fallback) and writes challenge-format shards.
  2. train_gpt.py end to end in a subprocess on the CPU with a tiny preset (PRESET below): training,
     GPTQ Hessians, int6 GPTQ of every attention/MLP matrix, the brotli artifact, roundtrip,
     sliding window and the default legal evaluation (score-first TTT + ETLB + n-gram tilt).
  3. a summary: stage seconds, artifact bytes, every score and the final_score line.

The work directory (data, logs/demo.txt, the artifact) is a temporary one, removed at the end
unless --keep or --workdir DIR is given. Exit status: 0 on success, 1 if a step failed (the
tail of its output is printed), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from summarize_logs import source_fields  # noqa: E402  (the settings of a train_gpt.py source)
BUILD_SHARDS = REPO / "data" / "build_shards.py"
TRAIN_GPT = REPO / "train_gpt.py"
VAL_EVERY = 10  # every 10th document (indices 9, 19, ...) goes to validation
RUN_ID = "demo"

# The tiny preset, as train_gpt.py environment variables: a 4-block, 96-wide model that still has
# every feature of the default (GQA, XSA on every block, partial RoPE, looping of blocks 1,2 from
# step 45, skip gates, two residual lanes on block 3, SmearGate, the sparse attention gate; value
# embeddings on blocks 2,3 as PR #1285 had them), 90 steps of 4096 tokens (~370K tokens, about
# 1.2 passes over the repository's text). QUANT_MIN_NUMEL=1024 is below the smallest attention/MLP
# matrix (the 48x96 K/V projections), so GPTQ int6-quantizes all 24 of them. The whole demo takes
# ~2 min on 2 idle cores: ~90 s training, ~25 s evaluation (most of it score-first TTT).
PRESET: dict[str, str] = {
    "VOCAB_SIZE": "512",
    "ITERATIONS": "90",
    "WARMUP_STEPS": "0",  # compile warm-up: nothing to warm up with COMPILE=0
    "TRAIN_BATCH_TOKENS": "4096",  # 8 accumulation micro-steps x 4 sequences x 128 tokens
    "TRAIN_SEQ_LEN": "128",
    "MAX_WALLCLOCK_SECONDS": "0",
    "TRAIN_LOG_EVERY": "10",
    "VAL_LOSS_EVERY": "0",
    "NUM_LAYERS": "4",
    "MODEL_DIM": "96",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "XSA_LAST_N": "4",
    "ROPE_DIMS": "16",
    "VE_DIM": "32",
    "VE_LAYERS": "2,3",
    "NUM_LOOPS": "1",
    "LOOP_START": "1",
    "LOOP_END": "2",
    "ENABLE_LOOPING_AT": "0.5",
    "PARALLEL_START_LAYER": "3",
    "MUON_MOMENTUM_WARMUP_STEPS": "30",
    "EMA_DECAY": "0.9",  # averages over ~10 steps, well inside the 90
    "GPTQ_CALIBRATION_BATCHES": "8",
    "QUANT_MIN_NUMEL": "1024",
    "EVAL_SEQ_LEN": "128",
    "EVAL_STRIDE": "64",
    "EVAL_BATCH_SEQS": "32",
    "TTT_CHUNK": "2048",
    "PRE_QUANT_TTT_CHUNK": "2048",
    "COMPILE": "0",
    "SEED": "1337",
}
# Caps that keep a large --text corpus from making the demo slow: validation text bounds the
# evaluation time (~40 KB: ~23K tokens), training text the tokenizer and encoding time.
MAX_VAL_BYTES = 40_000
MAX_TRAIN_BYTES = 4_000_000

STAGE_RE = re.compile(r"^stage:(\S+) seconds:([0-9.]+)")
# Score lines: `LABEL val_loss:X val_bpb:Y eval_time:Nms`, in older logs followed by ` legal:1`.
SCORE_RE = re.compile(r"^(\S+) val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms(?:\s.*)?$")
PRE_QUANT_RE = re.compile(r"^pre-quantization post-ema val_loss:(\S+) val_bpb:(\S+)")
TOTAL_RE = re.compile(r"^Total submission size (\S+): (\d+) bytes")
MODEL_RE = re.compile(r"^Serialized model (\S+): (\d+) bytes")
CODE_RE = re.compile(r"^Code size: (\d+) bytes")
GPTQ_RE = re.compile(r"^GPTQ quantization: .*\bint6:(\d+)")
FINAL_RE = re.compile(r"^final_score metric:(\S+) val_bpb:(\S+) legal:(\d)")
STEP_RE = re.compile(r"^(\d+)/(\d+) train_loss: ?([0-9.]+)")


class DemoError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- documents


def split_paragraph_docs(text: str, max_chars: int = 2000) -> list[str]:
    """Consecutive paragraphs (blank-line separated) grouped into documents of about max_chars."""
    docs, cur, size = [], [], 0
    for para in re.split(r"\n[ \t]*\n", text):
        if not para.strip():
            continue
        if cur and size + len(para) > max_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para.strip("\n"))
        size += len(para) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def repo_files(repo: Path) -> list[Path]:
    """The repository's Markdown and Python files (tracked ones in a git checkout), logs/ excluded."""
    rels: list[str] | None = None
    if (repo / ".git").exists():
        try:
            out = subprocess.run(["git", "ls-files", "-z", "--", "*.md", "*.py"], cwd=repo,
                                 capture_output=True, check=True).stdout
            rels = [r for r in out.decode("utf-8", "replace").split("\0") if r]
        except (OSError, subprocess.CalledProcessError):
            rels = None
    if rels is None:  # not a git checkout (an unpacked archive): every file on disk
        rels = [p.relative_to(repo).as_posix() for pat in ("**/*.md", "**/*.py") for p in repo.glob(pat)]
    keep = []
    for rel in sorted(set(rels)):
        parts = rel.split("/")
        if parts[0] == "logs" or any(p.startswith(".") or p == "__pycache__" for p in parts):
            continue
        if (repo / rel).is_file():
            keep.append(repo / rel)
    return keep


def repo_docs(repo: Path = REPO) -> list[str]:
    docs = []
    for path in repo_files(repo):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += split_paragraph_docs(text)
    return docs


def text_docs(path: Path) -> list[str]:
    """--text: .jsonl with a "text" field per line, else plain text with blank-line separated documents."""
    if not path.is_file():
        raise DemoError(f"--text {path}: no such file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.name.lower().endswith(".jsonl"):
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DemoError(f"--text {path}: line {n} is not JSON") from None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
                docs.append(rec["text"])
        return docs
    return [d.strip("\n") for d in re.split(r"\n[ \t]*\n", raw) if d.strip()]


def take_bytes(docs: list[str], limit: int) -> list[str]:
    """The leading documents that fit in `limit` UTF-8 bytes (at least one)."""
    out, size = [], 0
    for d in docs:
        size += len(d.encode("utf-8"))
        if out and size > limit:
            break
        out.append(d)
    return out


def split_docs(docs: list[str], every: int = VAL_EVERY, max_val_bytes: int = MAX_VAL_BYTES,
               max_train_bytes: int = MAX_TRAIN_BYTES) -> tuple[list[str], list[str]]:
    """(train, val): every `every`-th document (the 10th, 20th, ...) is validation, the others training.
    A validation document that is also a training document verbatim is dropped, so nothing scored
    was trained on; each split is then cut to its byte cap (leading documents kept)."""
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    seen = set(train)
    val = [d for i, d in enumerate(docs) if i % every == every - 1 and d not in seen]
    return take_bytes(train, max_train_bytes), take_bytes(val, max_val_bytes)


def write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- running steps


def run_streamed(cmd: list[str], cwd: Path, env: dict, quiet: bool, prefix: str = "  | ") -> tuple[int, list[str]]:
    """Run cmd, echoing its merged stdout/stderr (unless quiet); return (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=60)
    env = {**env, "PYTHONUNBUFFERED": "1"}  # lines as they are printed, not when a buffer fills
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if not quiet:
                print(prefix + line, flush=True)
        return proc.wait(), list(tail)
    except BaseException:  # Ctrl-C: don't leave the child running
        proc.kill()
        proc.wait()
        raise


def setting_names(script: Path) -> set[str]:
    """The environment variable names of train_gpt.py's settings (its Hyperparameters fields), read
    with ast so that nothing is imported; empty if the class cannot be found."""
    try:
        text = script.read_text(encoding="utf-8")
    except OSError:
        return set()
    return {name.upper() for name in source_fields(text) or ()}


def threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def build_dataset(docs: list[str], work: Path, vocab: int, quiet: bool) -> dict:
    train, val = split_docs(docs)
    if len(train) < 20 or not val:
        raise DemoError(f"too little text: {len(train)} training and {len(val)} validation documents "
                        f"(need at least 20 and 1)")
    src = work / "text"
    src.mkdir(parents=True, exist_ok=True)
    write_jsonl(src / "train.jsonl", train)
    write_jsonl(src / "val.jsonl", val)
    out = work / "data"
    for attempt in range(3):
        cmd = [sys.executable, str(BUILD_SHARDS), "--train-docs", str(src / "train.jsonl"),
               "--val-docs", str(src / "val.jsonl"), "--vocab-size", str(vocab), "--out", str(out),
               "--threads", str(threads())]
        code, tail = run_streamed(cmd, work, dict(os.environ), quiet)
        if code != 0:
            raise DemoError("data/build_shards.py failed (exit %d):\n%s" % (code, "\n".join(tail[-30:])))
        pieces = json.loads((out / "manifest.json").read_text())["tokenizers"][0]["vocab_size"]
        if pieces == vocab:
            break
        # a small corpus gives fewer pieces than asked (hard_vocab_limit is off); train_gpt.py needs
        # VOCAB_SIZE to equal the tokenizer's size, so build again at that size
        print(f"the text gave a {pieces}-piece tokenizer, not {vocab}: building at VOCAB_SIZE={pieces}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        vocab = pieces
    else:
        raise DemoError(f"could not train a tokenizer of a stable size (last: {pieces} pieces for {vocab})")
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["datasets"][0]["stats"]
    val_bytes = sum(len(d.encode("utf-8")) for d in val)
    return {"data_dir": out, "train_docs": len(train), "val_docs": len(val), "train_tokens": stats["tokens_train"],
            "val_tokens": stats["tokens_val"], "val_bytes": val_bytes,
            "train_bytes": sum(len(d.encode("utf-8")) for d in train),
            "vocab": vocab}


def parse_log(lines: list[str]) -> dict:
    """The summary's numbers from the run's log lines (whole-line matches only: the log also holds
    the hyperparameters and the source code)."""
    r: dict = {"stages": [], "scores": [], "pre_quant": None, "total": None, "model": None, "code": None,
               "int6": None, "final": None, "gptq_line": None, "last_step": None, "warnings": []}
    for ln in lines:
        ln = ln.rstrip()
        if m := STAGE_RE.match(ln):
            r["stages"].append((m.group(1), float(m.group(2))))
        elif m := PRE_QUANT_RE.match(ln):
            r["pre_quant"] = (float(m.group(1)), float(m.group(2)))
        elif m := SCORE_RE.match(ln):
            r["scores"].append((m.group(1), float(m.group(2)), float(m.group(3)), int(m.group(4))))
        elif m := TOTAL_RE.match(ln):
            r["total"] = (m.group(1), int(m.group(2)))
        elif m := MODEL_RE.match(ln):
            r["model"] = int(m.group(2))
        elif m := CODE_RE.match(ln):
            r["code"] = int(m.group(1))
        elif m := GPTQ_RE.match(ln):
            r["int6"], r["gptq_line"] = int(m.group(1)), ln
        elif m := FINAL_RE.match(ln):
            r["final"] = (m.group(1), float(m.group(2)), int(m.group(3)), ln)
        elif m := STEP_RE.match(ln):
            r["last_step"] = (int(m.group(1)), float(m.group(3)))
        elif ln.startswith("warning:") and ln not in r["warnings"]:
            r["warnings"].append(ln)
    return r


def print_summary(r: dict, ds: dict, vocab: int, work: Path, kept: bool, seconds: dict) -> None:
    print("\n" + "=" * 72)
    print("demo summary")
    print("=" * 72)
    uniform = math.log2(vocab) * (ds["val_tokens"] - ds["val_docs"]) / max(ds["val_bytes"], 1)
    print(f"dataset: {ds['train_docs']} train docs ({ds['train_tokens']:,} tokens), "
          f"{ds['val_docs']} val docs ({ds['val_tokens']:,} tokens, {ds['val_bytes']:,} bytes), "
          f"{vocab}-piece tokenizer; built in {seconds['dataset']:.1f}s")
    if r["last_step"]:
        print(f"last logged train_loss: {r['last_step'][1]:.4f} at step {r['last_step'][0]}")
    print("stages (seconds):")
    print(f"  dataset (this script, data/build_shards.py): {seconds['dataset']:.2f}")
    for name, s in r["stages"]:
        print(f"  stage:{name} seconds:{s:.2f}")
    if r["gptq_line"]:
        print(r["gptq_line"])
    if r["code"] is not None and r["model"] is not None:
        print(f"artifact: model {r['model']:,} bytes + code {r['code']:,} bytes")
    if r["total"]:
        print(f"Total submission size {r['total'][0]}: {r['total'][1]} bytes "
              f"({'under' if r['total'][1] < 16_000_000 else 'OVER'} the 16,000,000-byte cap)")
    print("scores:")
    print(f"  untrained (uniform over {vocab} tokens): val_bpb ~{uniform:.3f}")
    if r["pre_quant"]:
        print(f"  pre-quantization post-ema val_loss:{r['pre_quant'][0]:.4f} val_bpb:{r['pre_quant'][1]:.4f}")
    for label, loss, bpb, ms in r["scores"]:
        print(f"  {label} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms}ms")
    if r["final"]:
        print(r["final"][3])
    for w in r["warnings"]:
        print(w)
    print(f"run: {seconds['run']:.1f}s; demo total: {seconds['total']:.1f}s")
    if kept:
        print(f"work dir: {work}")
        print(f"  log:      {work / 'logs' / (RUN_ID + '.txt')}")
        print(f"  artifact: {work / 'final_model.int6.ptz'}")
        print(f"  data:     {ds['data_dir']} (DATA_DIR; VOCAB_SIZE={vocab})")
    else:
        print("work dir removed (--keep or --workdir DIR keeps the log, artifact and data)")


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or key != key.upper():
            raise DemoError(f"--set {item!r}: expected NAME=VALUE with an upper-case train_gpt.py setting")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo_cpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.fill("preset: " + " ".join(f"{k}={v}" for k, v in PRESET.items()), 100,
                             subsequent_indent="  ", break_on_hyphens=False),
    )
    p.add_argument("--text", metavar="PATH", type=Path,
                   help="corpus instead of the repository's files: .txt (documents separated by blank lines) "
                        "or .jsonl (a \"text\" field per line)")
    p.add_argument("--workdir", metavar="DIR", type=Path,
                   help="work directory to use and keep (data/, logs/demo.txt, the artifact); default: a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a preset setting, e.g. --set ITERATIONS=300 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="print only the summary, not the steps' output")
    p.add_argument("--script", metavar="PATH", type=Path, default=TRAIN_GPT,
                   help="train_gpt.py to run (default: the repository's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    try:
        overrides = parse_set(args.set)
    except DemoError as e:
        print(f"demo_cpu.py: {e}", file=sys.stderr)
        return 2
    preset = {**PRESET, **overrides}
    try:
        vocab = int(preset["VOCAB_SIZE"])
    except ValueError:
        print(f"demo_cpu.py: VOCAB_SIZE={preset['VOCAB_SIZE']!r} is not an integer", file=sys.stderr)
        return 2
    script = args.script.resolve()
    if not script.is_file():
        print(f"demo_cpu.py: {script}: no such file", file=sys.stderr)
        return 2

    keep = bool(args.workdir or args.keep)
    if args.workdir:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="pgolf_demo_"))
    seconds: dict[str, float] = {}
    try:
        # --- 1. dataset
        t = time.perf_counter()
        source = str(args.text) if args.text else f"the repository's Markdown and Python files ({REPO})"
        print(f"[1/3] dataset from {source} -> {work / 'data'}", flush=True)
        docs = text_docs(args.text) if args.text else repo_docs(REPO)
        ds = build_dataset(docs, work, vocab, args.quiet)
        vocab = ds["vocab"]
        preset["VOCAB_SIZE"] = str(vocab)
        seconds["dataset"] = time.perf_counter() - t

        # --- 2. train_gpt.py
        # the preset alone decides the run: settings exported in the shell are not inherited
        # (--set NAME=VALUE changes one)
        names = setting_names(script)
        env = {k: v for k, v in os.environ.items() if k not in names}
        env.setdefault("OMP_NUM_THREADS", str(threads()))
        # idle OpenMP threads sleep instead of spinning: ~10% slower on idle cores, but 1.6x faster
        # than the default when another process holds one of 2 cores (measured; 2.9x at worst)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU demo, also on a machine with a GPU
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        env.update(preset)
        env.update(DATA_DIR=str(ds["data_dir"]) + "/", RUN_ID=RUN_ID,
                   ARTIFACT_PATH=str(work / "final_model.int6.ptz"), CHECKPOINT_PATH=str(work / "final_model.pt"))
        env.update({k: v for k, v in overrides.items() if k in ("DATA_DIR", "ARTIFACT_PATH", "CHECKPOINT_PATH")})
        log_path = work / "logs" / f"{RUN_ID}.txt"
        log_path.unlink(missing_ok=True)
        print(f"[2/3] {script.name} on the CPU (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}): "
              f"{' '.join(f'{k}={v}' for k, v in preset.items())}", flush=True)
        t = time.perf_counter()
        code, tail = run_streamed([sys.executable, str(script)], work, env, args.quiet)
        seconds["run"] = time.perf_counter() - t
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.exists() else tail
        r = parse_log(lines)
        if code != 0 or r["final"] is None:
            keep = True  # keep what there is to look at
            what = f"exit {code}" if code != 0 else "no final_score line"
            raise DemoError(f"train_gpt.py failed ({what}); the end of its output:\n" + "\n".join(tail[-40:])
                            + f"\n(log: {log_path}; work dir kept: {work})")

        # --- 3. summary
        seconds["total"] = time.perf_counter() - t_start
        print("[3/3] summary", flush=True)
        print_summary(r, ds, vocab, work, keep, seconds)
        return 0
    except DemoError as e:
        print(f"\ndemo_cpu.py: {e}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
