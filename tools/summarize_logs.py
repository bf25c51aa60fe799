#!/usr/bin/env python3
"""Summarize train_gpt.py logs (one per seed) into a Markdown table and a submission.json.

    python3 tools/summarize_logs.py logs/run_seed1337.txt logs/run_seed42.txt logs/run_seed2025.txt \
        [--out RESULTS.md] [--submission submission.json] [--records-dir DIR] \
        [--author A --github-id G --name N --blurb B --hardware H --date YYYY-MM-DD --technique-summary T]
        [--allow-problems]

Reads the lines train_gpt.py writes (see tools/README.md), never the source code that the log
also contains. Both score-line formats are read: the older one with `legal:1`/`legal:0 ...` on
every score line, and the current one (score lines end at `eval_time:Nms`; legality is stated on a
`legality:` line before evaluation, and again on `final_score`). The artifact verdict is recomputed
from the byte counts against the decimal 16,000,000-byte cap; the log's own "fits" line is not
trusted. A log that crashed, stops early or lacks a line is listed under "Problems" and makes the
exit code 1 (unless --allow-problems).

submission.json uses the field names of the official records (records/track_10min_16mb/*/
submission.json in openai/parameter-golf): per seed artifact_bytes (code + compressed model),
bytes_model_compressed, bytes_code, pre_quant_val_bpb, step_avg_ms, train_time_s, eval_time_s;
top level bytes_total / artifact_bytes_max / artifact_bytes_mean, technique_summary and compliance
flags (what the scored evaluation uses: score_first_ttt, no_etlb, ngram_tilt, no_pre_quant_ttt).
Standard library only; not part of train_gpt.py (does not count toward the artifact).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CAP_BYTES = 16_000_000  # decimal: code bytes + compressed model bytes
TIME_LIMIT_S = 600.0  # training (incl. GPTQ Hessians) and evaluation, each, on 8xH100
SEP = "=" * 100  # train_gpt.py's header separator (file logs only)
REPO = Path(__file__).resolve().parents[1]

# Score lines, in the order of the table's columns: (label in the log, column title). The labels
# train_gpt.py prints: final_int6_roundtrip, final_int6_{sliding_window,ttt}[_etlb][_ngram],
# pre_quant_ttt_scorefirst, and the pre-quantization line (here "pre_quant").
SCORE_COLUMNS = [
    ("final_int6_sliding_window", "sliding"),
    ("final_int6_sliding_window_etlb", "sliding+ETLB"),
    ("final_int6_ttt", "score-first TTT"),
    ("final_int6_ttt_etlb", "TTT+ETLB"),
    ("final_int6_sliding_window_ngram", "sliding+ngram"),
    ("final_int6_sliding_window_etlb_ngram", "sliding+ETLB+ngram"),
    ("final_int6_ttt_ngram", "TTT+ngram"),
    ("final_int6_ttt_etlb_ngram", "TTT+ETLB+ngram"),
    ("pre_quant_ttt_scorefirst", "pre-quant TTT pass"),
    ("final_int6_roundtrip", "roundtrip"),
    ("pre_quant", "pre-quant (EMA)"),
]
KNOWN_LABELS = re.compile(r"final_int6_roundtrip|final_int6_(?:sliding_window|ttt)(?:_etlb)?(?:_ngram)?"
                          r"|pre_quant_ttt_scorefirst")
# Passes that always run; with EVAL_ABLATIONS=1 every other final_int6_* pass except the final
# metric's is an ablation (a smaller subset of the enabled TTT / ETLB / n-gram tilt).
ALWAYS_RUN = ("final_int6_roundtrip", "final_int6_sliding_window")
# Hyperparameters that differ between machines or runs by design (not part of a recipe).
PER_RUN_FIELDS = {"seed", "run_id", "data_dir", "artifact_path", "checkpoint_path", "save_checkpoint",
                  "load_checkpoint", "load_artifact"}

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf"
RX = {name: re.compile(pat) for name, pat in {
    "hparam": r"  ([a-z_][a-z0-9_]*):(?: (.*))?",
    "world": r"world_size: (\d+) grad_accum_steps: (\d+) device: (\S+) attention: (\S+)",
    "python": r"Running Python (\S+).*",
    "pytorch": r"Running PyTorch (\S+)",
    "gpu": r"\|\s+\d+\s+(NVIDIA .+?)\s{2,}(?:On|Off)\s+\|.*",
    "smi_date": r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (\w{3}) +(\d{1,2}) \d\d:\d\d:\d\d (\d{4})\s*",
    "val_tokens": r"val_tokens: (\d+)",
    "train_shards": r"train_shards: (\d+)",
    "model_params": r"model_params:(\d+)",
    "load_checkpoint": r"load_checkpoint: (.*) hessians:(\d+)",
    "load_artifact": r"load_artifact: (.*) \((\d+) bytes\)",
    "train_step": rf"(\d+)/(\d+) train_loss: ({NUM}) train_time: ({NUM})m tok/s: (\d+)",
    "val_step": rf"(\d+)/(\d+) val_loss: ({NUM}) val_bpb: ({NUM})",
    "throughput": r"throughput: tok/s_before_recurrence:(\d+) tok/s_after_recurrence:(\d+) "
                  r"per_gpu_before:(\d+) per_gpu_after:(\d+) world_size:(\d+)",
    "train_budget": rf"train_budget: train:({NUM})s hessians:({NUM})s total:({NUM})s limit:(\d+)s steps:(\d+)",
    "stage": rf"stage:(\S+) seconds:({NUM})",
    "pre_quant": rf"pre-quantization post-ema val_loss:({NUM}) val_bpb:({NUM}) eval_time:(\d+)ms",
    # legal:... closes each score line in the older format only
    "score": rf"(final_int6_[a-z_]+|pre_quant_ttt_scorefirst) val_loss:({NUM}) val_bpb:({NUM}) "
             rf"eval_time:(\d+)ms(?: legal:([01])(.*))?",
    "legality": r"legality: legal:([01])(?: NOT leaderboard-legal: (.*))?",
    "code": r"Code size: (\d+) bytes.*",
    "model": r"Serialized model int6\+(\w+): (\d+) bytes",
    "total": r"Total submission size int6\+(\w+): (\d+) bytes",
    "fits": r"artifact: fits total:(\d+) limit:(\d+) margin:(-?\d+)",
    "over": r"ARTIFACT OVER LIMIT: total (\d+) bytes > (\d+) by (\d+) bytes.*",
    "eval_total": rf"eval_time_total: ({NUM})s limit:(\d+)s.*",
    # reasons after "NOT leaderboard-legal:" (current format) or "reasons:" (older format)
    "final": rf"final_score metric:(\S+) val_bpb:({NUM}) legal:([01])(?: (?:NOT leaderboard-legal|reasons): (.*))?",
    "error": r"error: (\w+): (.*)",
    "traceback": r"Traceback \(most recent call last\):",
}.items()}


@dataclass
class Score:
    label: str
    loss_text: str
    bpb_text: str
    eval_ms: int
    legal: bool | None  # None: the line does not say (current format: see RunLog.legality_line)
    tail: str = ""

    @property
    def val_loss(self) -> float:
        return float(self.loss_text)

    @property
    def val_bpb(self) -> float:
        return float(self.bpb_text)


@dataclass
class RunLog:
    """What one log says about one run (the last run, if a RUN_ID was reused)."""
    path: str
    exists: bool = True
    n_runs: int = 0
    seed: int | None = None
    hparams: dict = field(default_factory=dict)
    world_size: int | None = None
    device: str = ""
    python_version: str = ""
    torch_version: str = ""
    gpus: list = field(default_factory=list)
    run_date: str | None = None  # YYYY-MM-DD, from the date line nvidia-smi prints in the header
    source_lines: list = field(default_factory=list)
    header_state: str = "pre"  # where the parser stood when the file ended
    val_tokens: int | None = None
    model_params: int | None = None
    loaded_from: str = ""
    last_step: tuple | None = None  # (step, iterations) of the last train_loss line
    steps: int | None = None
    train_text: str | None = None  # train_budget total (training + Hessians), as printed
    train_only_s: float | None = None
    hessian_s: float | None = None
    stages: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)  # label -> Score
    code_bytes: int | None = None
    model_bytes: int | None = None
    total_bytes: int | None = None
    compressor: str = ""
    log_verdict: tuple | None = None  # ("fits"|"over", total, limit) as the log printed it
    eval_text: str | None = None  # eval_time_total, as printed
    final_metric: str | None = None
    final_bpb_text: str | None = None
    final_legal: bool | None = None
    final_reasons: str = ""
    legality_line: tuple | None = None  # (legal, reasons) of the `legality:` line (current format)
    error: str | None = None
    last_line: tuple = (0, "")
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    status: str = "ok"

    # ---- derived values
    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def label(self) -> str:
        return str(self.seed) if self.seed is not None else self.name

    @property
    def train_s(self) -> float | None:
        return float(self.train_text) if self.train_text is not None else None

    @property
    def eval_s(self) -> float | None:
        return float(self.eval_text) if self.eval_text is not None else None

    @property
    def fits(self) -> bool | None:
        return None if self.total_bytes is None else self.total_bytes <= CAP_BYTES

    @property
    def final_score(self) -> Score | None:
        return self.scores.get(self.final_metric) if self.final_metric else None

    @property
    def final_bpb(self) -> float | None:
        return float(self.final_bpb_text) if self.final_bpb_text is not None else None

    @property
    def final_loss(self) -> float | None:
        s = self.final_score
        return s.val_loss if s and self.final_bpb_text is not None else None

    @property
    def pre_quant_ttt(self) -> bool:
        return self.hparams.get("pre_quant_ttt") == "True" or "pre_quant_ttt_scorefirst" in self.scores

    @property
    def eval_ablations(self) -> bool:
        return self.hparams.get("eval_ablations") == "True"

    @property
    def eval_without_ablations_s(self) -> float | None:
        """eval_time_total minus the ablation-only passes (what the submitted run would time)."""
        if self.eval_s is None or not self.eval_ablations:
            return self.eval_s
        extra = sum(self.scores[k].eval_ms for k in self.ablation_labels) / 1000
        return self.eval_s - extra

    @property
    def ablation_labels(self) -> list[str]:
        """Score lines that only ran because of EVAL_ABLATIONS=1."""
        if not self.eval_ablations:
            return []
        return [k for k in self.scores
                if k.startswith("final_int6_") and k not in ALWAYS_RUN and k != self.final_metric]

    def time_verdict(self, seconds: float | None) -> str:
        if seconds is None:
            return "MISSING"
        if seconds <= TIME_LIMIT_S:
            return "ok"
        return "OVER" if (self.world_size or 8) >= 8 else "over (on fewer than 8 GPUs)"

    def legality(self) -> tuple[str, list[str]]:
        """("yes"|"NO"|"?", reasons): legal:1 on final_score AND fits AND no pre-quant TTT AND complete."""
        reasons = []
        if self.final_legal is None:
            reasons.append("no final_score line")
            if self.legality_line and not self.legality_line[0]:
                why = self.legality_line[1]
                reasons.append("the legality line says legal:0" + (f" ({why})" if why else ""))
        elif not self.final_legal:
            reasons.append("the log says legal:0" + (f" ({self.final_reasons})" if self.final_reasons else ""))
        if self.total_bytes is None:
            reasons.append("artifact size unknown")
        elif self.total_bytes > CAP_BYTES:
            reasons.append(f"artifact {self.total_bytes:,} bytes > {CAP_BYTES:,}")
        if self.pre_quant_ttt:
            reasons.append("pre-quant TTT (trains the artifact on validation tokens before scoring them)")
        for what, secs in (("training", self.train_s), ("evaluation", self.eval_s)):
            if self.time_verdict(secs) == "OVER":
                reasons.append(f"{what} {secs:.1f}s > {TIME_LIMIT_S:.0f}s")
        if self.problems and not reasons:
            reasons.append("the log has problems (see Problems)")
        if reasons:
            return "NO", reasons
        unsure = [f"{what} {secs:.1f}s > {TIME_LIMIT_S:.0f}s measured on {self.world_size} GPU(s); "
                  f"the limit is for 8xH100" for what, secs in (("training", self.train_s), ("evaluation", self.eval_s))
                  if self.time_verdict(secs).startswith("over (")]
        return ("?", unsure) if unsure else ("yes", [])


# =============================================================================
# Parsing
# =============================================================================

def parse_log(path: str | Path) -> RunLog:
    path = str(path)
    if not os.path.isfile(path):
        r = RunLog(path=path, exists=False, status="MISSING")
        r.problems.append(f"log file {path} does not exist (the run never started, or wrong path)")
        m = re.search(r"seed(\d+)", os.path.basename(path))
        r.seed = int(m.group(1)) if m else None
        return r
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return parse_text(text, path)


def parse_text(text: str, path: str = "<log>") -> RunLog:
    r = RunLog(path=path)
    state, prev, expect_code = "pre", "", False
    last_meaningful = (0, "")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if state in ("pre", "normal") and line == "Hyperparameters:":
            n_runs = r.n_runs + 1
            r = RunLog(path=path, n_runs=n_runs)  # a reused RUN_ID appends: keep the last run only
            state, expect_code = "hp", prev == SEP
            last_meaningful = (n, line)
        elif state == "hp":
            m = RX["hparam"].fullmatch(line)
            if m:
                r.hparams[m.group(1)] = m.group(2) or ""
            elif expect_code:  # file log: everything up to the separator is the header
                state = "code"
                if not _parse_world(r, line):
                    r.source_lines.append(line)
            else:  # console capture: no source dump
                state = "normal"
                last_meaningful = _parse_body(r, n, line) or last_meaningful
        elif state == "code":
            # the source ends at the separator that is followed by "Running Python" (or the end of the file)
            if line == SEP and (n == len(lines) or lines[n].startswith("Running Python")):
                state = "env"
            else:
                r.source_lines.append(line)
        elif state == "env":
            if line == SEP:
                state = "normal"
            elif m := RX["python"].fullmatch(line):
                r.python_version = m.group(1)
            elif m := RX["pytorch"].fullmatch(line):
                r.torch_version = m.group(1)
            elif m := RX["gpu"].fullmatch(line):
                r.gpus.append(m.group(1).strip())
            elif m := RX["smi_date"].fullmatch(line):
                try:
                    r.run_date = datetime.datetime.strptime(" ".join(m.groups()), "%b %d %Y").date().isoformat()
                except ValueError:
                    pass
        elif state == "normal":
            last_meaningful = _parse_body(r, n, line) or last_meaningful
        prev = line
    r.header_state = state
    r.last_line = last_meaningful
    if "seed" in r.hparams and re.fullmatch(r"-?\d+", r.hparams["seed"]):
        r.seed = int(r.hparams["seed"])
    else:
        m = re.search(r"seed(\d+)", os.path.basename(path))
        r.seed = int(m.group(1)) if m else None
    _check(r)
    return r


def _parse_world(r: RunLog, line: str) -> bool:
    m = RX["world"].fullmatch(line)
    if m:
        r.world_size, r.device = int(m.group(1)), m.group(3)
    return bool(m)


def _parse_body(r: RunLog, n: int, line: str) -> tuple | None:
    """One line after the header; returns (n, line) when the line is one of train_gpt.py's."""
    if not line.strip():
        return None
    if _parse_world(r, line):
        return n, line
    for key, rx in RX.items():
        if key in ("hparam", "world", "python", "pytorch", "gpu", "smi_date"):
            continue
        m = rx.fullmatch(line)
        if not m:
            continue
        g = m.groups()
        if key == "val_tokens":
            r.val_tokens = int(g[0])
        elif key == "model_params":
            r.model_params = int(g[0])
        elif key == "load_checkpoint":
            r.loaded_from = f"LOAD_CHECKPOINT={g[0]}"
        elif key == "load_artifact":
            r.loaded_from = f"LOAD_ARTIFACT={g[0]}"
        elif key == "train_step":
            r.last_step = (int(g[0]), int(g[1]))
        elif key == "train_budget":
            r.train_only_s, r.hessian_s, r.train_text, r.steps = float(g[0]), float(g[1]), g[2], int(g[4])
        elif key == "stage":
            r.stages[g[0]] = float(g[1])
        elif key == "pre_quant":
            r.scores["pre_quant"] = Score("pre_quant", g[0], g[1], int(g[2]), None)
        elif key == "score":
            legal = None if g[4] is None else g[4] == "1"
            r.scores[g[0]] = Score(g[0], g[1], g[2], int(g[3]), legal, (g[5] or "").strip())
        elif key == "legality":
            r.legality_line = (g[0] == "1", (g[1] or "").strip())
        elif key == "code":
            r.code_bytes = int(g[0])
        elif key == "model":
            r.compressor, r.model_bytes = g[0], int(g[1])
        elif key == "total":
            r.compressor, r.total_bytes = g[0], int(g[1])
        elif key == "fits":
            r.log_verdict = ("fits", int(g[0]), int(g[1]))
        elif key == "over":
            r.log_verdict = ("over", int(g[0]), int(g[1]))
        elif key == "eval_total":
            r.eval_text = g[0]
        elif key == "final":
            r.final_metric, r.final_bpb_text, r.final_legal = g[0], g[1], g[2] == "1"
            r.final_reasons = (g[3] or "").strip()
        elif key == "error":
            r.error = r.error or f"error: {g[0]}: {g[1]}"
        elif key == "traceback":
            r.error = r.error or "Python traceback (uncaught exception)"
        return n, line
    return None


def _check(r: RunLog) -> None:
    """Fill r.problems (the log is incomplete or inconsistent), r.notes and r.status."""
    P = r.problems
    if r.n_runs == 0:
        r.status = "NOT A LOG"
        P.append("no `Hyperparameters:` line: not a train_gpt.py log (or the run died before logging)")
        return
    if r.n_runs > 1:
        P.append(f"the log holds {r.n_runs} runs (RUN_ID reused; train_gpt.py appends): only the last is summarized")
    where = {"hp": "in the hyperparameter list", "code": "inside the source-code dump of the header",
             "env": "inside the header (Python/PyTorch/nvidia-smi)"}.get(r.header_state)
    if r.error:
        r.status = "CRASHED"
        P.append(f"crashed: {r.error}")
    elif r.final_metric is None:
        r.status = "TRUNCATED"
        if where:
            P.append(f"the log ends {where}: the run never started")
        else:
            n, text = r.last_line
            P.append(f"no final_score line: the log stops {_stopped_during(r)} (last line {n}: `{text[:120]}`); "
                     "the run crashed, was killed or is still running")
    if (r.code_bytes is None and r.loaded_from.startswith("LOAD_ARTIFACT")
            and None not in (r.total_bytes, r.model_bytes)):
        r.code_bytes = r.total_bytes - r.model_bytes
        r.notes.append(f"code bytes {r.code_bytes} = total - model ({r.loaded_from} runs do not log `Code size`)")
    if r.status == "ok":
        for what, ok in (("a `Total submission size` line", r.total_bytes is not None),
                         ("a `Serialized model` line", r.model_bytes is not None),
                         ("a `Code size` line", r.code_bytes is not None),
                         ("an `eval_time_total` line", r.eval_text is not None),
                         (f"the `{r.final_metric}` score line named by final_score", r.final_score is not None)):
            if not ok:
                P.append(f"missing {what}")
        if r.train_text is None:
            if r.loaded_from:
                P.append(f"no `train_budget` line: this run did not train ({r.loaded_from}), "
                         "so its training time is not in this log")
            else:
                P.append("missing the `train_budget` line (training time unknown)")
        if P:
            r.status = "INCOMPLETE"
    s = r.final_score
    if s is not None and r.final_bpb_text is not None and s.val_bpb != r.final_bpb:
        P.append(f"final_score val_bpb {r.final_bpb_text} differs from the {r.final_metric} line's {s.bpb_text}")
    if r.legality_line is not None and r.final_legal is not None and r.legality_line[0] != r.final_legal:
        P.append(f"the `legality:` line says legal:{int(r.legality_line[0])} but final_score says "
                 f"legal:{int(r.final_legal)}")
    if s is not None and s.legal is not None and r.final_legal is not None and s.legal != r.final_legal:
        P.append(f"the {r.final_metric} line says legal:{int(s.legal)} but final_score says legal:{int(r.final_legal)}")
    if None not in (r.total_bytes, r.model_bytes, r.code_bytes) and r.total_bytes != r.model_bytes + r.code_bytes:
        P.append(f"Total submission size {r.total_bytes} != model {r.model_bytes} + code {r.code_bytes}")
    if r.log_verdict and r.total_bytes is not None:
        verdict, total, limit = r.log_verdict
        if total != r.total_bytes:
            P.append(f"the artifact line says total {total} but Total submission size is {r.total_bytes}")
        if (verdict == "fits") != (r.total_bytes <= CAP_BYTES):
            P.append(f"the log says the artifact {'fits' if verdict == 'fits' else 'is over'} (limit:{limit}) but "
                     f"{r.total_bytes:,} bytes is {'over' if r.total_bytes > CAP_BYTES else 'under'} the "
                     f"{CAP_BYTES:,}-byte cap: the table uses the cap")
    if r.status == "ok" and P:
        r.status = "INCONSISTENT"
    # notes (not problems)
    N = r.notes
    if r.world_size is not None and r.world_size < 8:
        N.append(f"ran on {r.world_size} GPU(s)/process(es) ({r.device}); the 600 s limits are for the 8xH100 run")
    if r.hparams.get("max_wallclock_seconds") in ("0", "0.0"):
        N.append(f"MAX_WALLCLOCK_SECONDS=0: training was not capped (fixed ITERATIONS={r.hparams.get('iterations')})")
    if r.hparams.get("artifact_limit_bytes") not in (None, str(CAP_BYTES)):
        N.append(f"ARTIFACT_LIMIT_BYTES={r.hparams['artifact_limit_bytes']} (not the challenge's {CAP_BYTES})")
    unknown = [k for k in r.scores if k != "pre_quant" and not KNOWN_LABELS.fullmatch(k)]
    if unknown:
        N.append(f"score line(s) with a label this summarizer does not know (not in the table): {', '.join(unknown)}")
    if r.eval_ablations and r.eval_s is not None:
        extra = r.ablation_labels
        if extra:
            N.append(f"EVAL_ABLATIONS=1: eval_time_total {r.eval_text}s includes the ablation passes "
                     f"{', '.join(extra)}; without them {r.eval_without_ablations_s:.1f}s")


def _stopped_during(r: RunLog) -> str:
    if r.train_text is None and not r.loaded_from:
        step = f" (last logged step {r.last_step[0]}/{r.last_step[1]})" if r.last_step else ""
        return f"during training{step}"
    if r.total_bytes is None:
        return "during quantization/serialization"
    done = [k for k in r.scores if k.startswith("final_")]  # in the order the log printed them
    return f"during evaluation (after {done[-1]})" if done else "during evaluation"


# =============================================================================
# Statistics and cross-log checks
# =============================================================================

def mean_std(values) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def cross_checks(runs: list[RunLog]) -> tuple[list[str], list[str]]:
    """(problems, notes) that involve several logs."""
    problems, notes = [], []
    seen: dict = {}
    for r in runs:
        if r.seed is not None:
            seen.setdefault(r.seed, []).append(r.name)
    for seed, names in seen.items():
        if len(names) > 1:
            problems.append(f"seed {seed} appears in {len(names)} logs ({', '.join(names)}): "
                            "the mean would count it twice")
    metrics = {r.final_metric for r in runs if r.final_metric}
    if len(metrics) > 1:
        problems.append("the final metric differs between logs (" + ", ".join(
            f"{r.label}: {r.final_metric}" for r in runs if r.final_metric) + "): the mean mixes different scores")
    ok = [r for r in runs if r.n_runs]
    codes = {r.code_bytes for r in ok if r.code_bytes is not None}
    if len(codes) > 1:
        notes.append("code size differs between logs (" + ", ".join(
            f"{r.label}: {r.code_bytes}" for r in ok if r.code_bytes is not None)
            + "): different train_gpt.py versions")
    if ok:
        keys = sorted(set().union(*(r.hparams for r in ok)) - PER_RUN_FIELDS)
        for k in keys:
            vals = [r.hparams.get(k, "(not in this log)") for r in ok]
            if len(set(vals)) > 1:
                notes.append(f"hyperparameter {k} differs: " + ", ".join(f"{r.label}: {v}" for r, v in zip(ok, vals)))
    sizes = {r.world_size for r in ok if r.world_size is not None}
    if len(sizes) > 1:
        notes.append("world_size differs between logs: " + ", ".join(f"{r.label}: {r.world_size}" for r in ok))
    return problems, notes


# =============================================================================
# Markdown
# =============================================================================

def _bytes(v) -> str:
    return f"{v:,}"


def _fmt(v, digits: int) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def _missing(r: RunLog) -> str:
    return r.status if r.status in ("CRASHED", "TRUNCATED", "MISSING", "NOT A LOG") else "MISSING"


def score_columns(runs: list[RunLog]) -> list[tuple[str, str]]:
    return [(k, t) for k, t in SCORE_COLUMNS if any(k in r.scores for r in runs)]


def _stat_rows(first: list[str], cols: list[list], digits: list[int]) -> list[list[str]]:
    """mean / std / n rows for numeric columns (None in `cols` = not a numeric column)."""
    means, stds, ns = list(first[0]), list(first[1]), list(first[2])
    for col, d in zip(cols, digits):
        if col is None:
            means.append(""), stds.append(""), ns.append("")
            continue
        m, s, n = mean_std(col)
        means.append(_fmt(m, d)), stds.append(_fmt(s, d)), ns.append(str(n))
    return [means, stds, ns]


def scores_table(runs: list[RunLog]) -> str:
    cols = score_columns(runs)
    header = ["seed", "status", "final metric", "final val_bpb", "final val_loss"] + [t for _, t in cols]
    rows, numeric = [], [[] for _ in range(2 + len(cols))]
    for r in runs:
        s = r.final_score
        row = [r.label, r.status, r.final_metric or _missing(r),
               r.final_bpb_text if r.final_bpb_text is not None else _missing(r),
               s.loss_text if s is not None and r.final_bpb_text is not None else _missing(r)]
        numeric[0].append(r.final_bpb), numeric[1].append(r.final_loss)
        for i, (k, _) in enumerate(cols):
            sc = r.scores.get(k)
            row.append(sc.bpb_text if sc else "—")
            numeric[2 + i].append(sc.val_bpb if sc else None)
        rows.append(row)
    stats = _stat_rows([["**mean**", "", ""], ["**std (n-1)**", "", ""], ["n", "", ""]], numeric,
                       [8] * len(numeric))
    return _table(header, rows + stats)


def budget_table(runs: list[RunLog]) -> str:
    header = ["seed", "log", "world_size", "steps", "total bytes", "model bytes", "code bytes",
              f"fits ≤ {CAP_BYTES:,}", "margin bytes", "train s (limit 600)", "eval s (limit 600)", "legal"]
    rows = []
    num = {k: [] for k in ("steps", "total", "model", "code", "margin", "train", "eval")}
    for r in runs:
        miss = _missing(r)
        fits = r.fits
        margin = CAP_BYTES - r.total_bytes if r.total_bytes is not None else None
        legal, _ = r.legality()
        rows.append([
            r.label, f"`{r.name}`", str(r.world_size) if r.world_size is not None else miss,
            str(r.steps) if r.steps is not None else ("— (no training)" if r.loaded_from else miss),
            _bytes(r.total_bytes) if r.total_bytes is not None else miss,
            _bytes(r.model_bytes) if r.model_bytes is not None else miss,
            _bytes(r.code_bytes) if r.code_bytes is not None else miss,
            miss if fits is None else ("yes" if fits else "**NO**"),
            _bytes(margin) if margin is not None else miss,
            _time_cell(r, r.train_text, r.train_s, "— (no training)" if r.loaded_from else miss),
            _time_cell(r, r.eval_text, r.eval_s, miss),
            "yes" if legal == "yes" else ("**NO**" if legal == "NO" else "?"),
        ])
        for k, v in (("steps", r.steps), ("total", r.total_bytes), ("model", r.model_bytes),
                     ("code", r.code_bytes), ("margin", margin), ("train", r.train_s), ("eval", r.eval_s)):
            num[k].append(v)
    cols = [None, None, num["steps"], num["total"], num["model"], num["code"], None, num["margin"],
            num["train"], num["eval"], None]
    digits = [0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0]
    stats = _stat_rows([["**mean**"], ["**std (n-1)**"], ["n"]], cols, digits)
    return _table(header, rows + stats)


def _time_cell(r: RunLog, text: str | None, secs: float | None, miss: str) -> str:
    if text is None:
        return miss
    verdict = r.time_verdict(secs)
    return text if verdict == "ok" else f"{text} **{verdict}**"


def problems_section(runs: list[RunLog], global_problems: list[str]) -> str:
    lines = []
    for r in runs:
        for p in r.problems:
            lines.append(f"- seed {r.label} (`{r.path}`): **{r.status}**: {p}")
    lines += [f"- {p}" for p in global_problems]
    return "\n".join(lines) if lines else "None: every log is complete and consistent."


def notes_section(runs: list[RunLog], global_notes: list[str]) -> str:
    lines = []
    for r in runs:
        legal, why = r.legality()
        if legal != "yes":
            lines.append(f"- seed {r.label}: legal **{legal}**: " + "; ".join(why))
    grouped: dict[str, list[str]] = {}  # the same note for several seeds is listed once
    for r in runs:
        for n in r.notes:
            grouped.setdefault(n, []).append(r.label)
    for n, labels in grouped.items():
        lines.append(f"- seed{'s' if len(labels) > 1 else ''} {', '.join(labels)}: {n}")
    lines += [f"- {n}" for n in global_notes]
    return "\n".join(lines) if lines else "None."


def summary_line(runs: list[RunLog]) -> str:
    m, s, n = mean_std([r.final_bpb for r in runs])
    if m is None:
        return "No final score in any log."
    legal = [r.legality()[0] for r in runs]
    metric = ", ".join(sorted({r.final_metric for r in runs if r.final_metric}))
    maxb = max((r.total_bytes for r in runs if r.total_bytes is not None), default=None)
    return (f"**val_bpb = {m:.8f}** (mean of {n} seed(s), {metric}; std (n-1) {_fmt(s, 8)}) | "
            f"max total bytes {_bytes(maxb) if maxb is not None else 'MISSING'} | "
            f"leaderboard-legal: {legal.count('yes')}/{len(runs)} seed(s)")


def render_markdown(runs: list[RunLog], command: str, title: str, repro: str | None = None,
                    extra_problems: list[str] = (), extra_notes: list[str] = ()) -> str:
    gp, gn = cross_checks(runs)
    gp, gn = gp + list(extra_problems), gn + list(extra_notes)
    parts = [f"# {title}", "", f"Command: `{command}`", "", summary_line(runs), "",
             "## Scores (val_bpb, lower is better)", "",
             "The final metric is the one on each log's `final_score` line. \"—\": that pass did not run.", "",
             scores_table(runs), "",
             "## Artifact, time and legality", "",
             f"Fits: `Total submission size` (code + compressed model) ≤ {CAP_BYTES:,} bytes, recomputed here. "
             "Train s: `train_budget` total (training + GPTQ Hessians). Eval s: `eval_time_total`. "
             "Legal: `legal:1` on `final_score`, fits, no pre-quant TTT, complete log, no time over the limit "
             "(\"?\": over on fewer than 8 GPUs, where the 8xH100 limit cannot be judged).", "",
             budget_table(runs), "",
             "## Problems", "", problems_section(runs, gp), "",
             "## Notes", "", notes_section(runs, gn), ""]
    if repro:
        parts += ["## Reproduction", "", "```bash", repro, "```", ""]
    return "\n".join(parts)


def has_problems(runs: list[RunLog], extra: list[str] = ()) -> bool:
    return any(r.problems for r in runs) or bool(cross_checks(runs)[0]) or bool(extra)


# =============================================================================
# Reproduction command (hyperparameters that differ from train_gpt.py's defaults)
# =============================================================================

def source_defaults(source: str) -> dict[str, str]:
    """Hyperparameters defaults of a train_gpt.py source, as train_gpt.py logs them (str(value))."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    consts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            out = {}
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value is not None:
                    if isinstance(st.value, ast.Name) and st.value.id in consts:
                        out[st.target.id] = str(consts[st.value.id])
                        continue
                    try:
                        out[st.target.id] = str(ast.literal_eval(st.value))
                    except ValueError:
                        pass
            return out
    return {}


def _env_value(v: str) -> str:
    return {"True": "1", "False": "0"}.get(v, v)


def source_fields(source: str) -> set[str] | None:
    """Every Hyperparameters field name of a train_gpt.py source (None: no such class, e.g. a packed wrapper)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            return {st.target.id for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)}
    return None


def reproduction(runs: list[RunLog], script: Path | None, nproc: int | None = None) -> str | None:
    ok = [r for r in runs if r.hparams]
    if not ok:
        return None
    log_defaults: list[dict] = []
    for src in {"\n".join(r.source_lines) for r in ok if r.source_lines}:
        d = source_defaults(src)
        if d:
            log_defaults.append(d)
    defaults = list(log_defaults)
    target = None  # the settings the script to run has; a logged setting it lacks cannot be passed to it
    if script is not None and script.is_file():
        text = script.read_text(encoding="utf-8")
        target = source_fields(text)
        d = source_defaults(text)
        if d:
            defaults.append(d)
    if not defaults:
        return None
    env, differs, lost = [], [], []
    for k, v in ok[0].hparams.items():
        if k in PER_RUN_FIELDS:
            continue
        if target is not None and k not in target:
            # not a setting of the script any more: only worth a word if the runs changed it
            if any(r.hparams.get(k) != v for r in ok):
                lost.append(f"{k.upper()} (differs between the logs)")
            elif any(d.get(k, v) != v for d in log_defaults):
                lost.append(f"{k.upper()}={_env_value(v)}")
            continue
        if any(r.hparams.get(k) != v for r in ok):
            differs.append(k.upper())
            continue
        if any(d.get(k) != v for d in defaults):
            env.append(f"{k.upper()}={shlex.quote(_env_value(v))}")
    seeds = " ".join(str(r.seed) for r in ok if r.seed is not None)
    ws = nproc or ok[0].world_size or 8
    env_s = " ".join(env)
    lines = ["# per seed (DATA_DIR: where datasets/ and tokenizers/ are; default ./data/):",
             f"for SEED in {seeds}; do",
             f"  SEED=$SEED RUN_ID=train_seed$SEED {env_s} \\".replace("  \\", " \\"),
             f"    torchrun --standalone --nproc_per_node={ws} train_gpt.py",
             "done",
             "# or, from the project root, with the runner:",
             f"python3 tools/run_seeds.py --nproc {ws} --seeds {','.join(seeds.split())} --prefix train "
             f"{env_s}".rstrip()]
    if differs:
        lines.insert(0, "# differs between the logs (set per seed as they were): " + ", ".join(differs))
    if lost:
        lines.insert(0, f"# set in the logs but not settings of {script.name} (cannot be passed; the runs "
                        "differ from it there): " + ", ".join(lost))
    return "\n".join(lines)


# =============================================================================
# submission.json and the records folder
# =============================================================================

def _r(v, d=8):
    return None if v is None else round(v, d)


def _mean(values, d=8):
    m, _, _ = mean_std(values)
    return _r(m, d)


def eval_uses(runs: list[RunLog]) -> dict[str, bool]:
    """What the scored evaluation (each log's final metric) uses: every log, or False."""
    metrics = [r.final_metric for r in runs if r.final_metric]
    every = lambda part: bool(metrics) and len(metrics) == len(runs) and all(part in m for m in metrics)  # noqa: E731
    anyone = lambda part: any(part in m for m in metrics)  # noqa: E731
    return {"ttt": every("_ttt"), "etlb": anyone("_etlb"), "ngram": anyone("_ngram"),
            "pre_quant_ttt": any(r.pre_quant_ttt for r in runs)}


def technique_summary(runs: list[RunLog]) -> str:
    """A one-line recipe from the first log's hyperparameters and the final metric (what the score used)."""
    r = next((x for x in runs if x.hparams), None)
    if r is None:
        return ""
    h = r.hparams
    model = []
    if h.get("vocab_size"):
        model.append(f"SP{h['vocab_size']}")
    if h.get("num_layers") and h.get("model_dim"):
        model.append(f"{h['num_layers']}L/{h['model_dim']}d")
    if h.get("mlp_mult"):
        model.append(f"MLP {h['mlp_mult'].removesuffix('.0')}x")
    if h.get("xsa_last_n") not in (None, "0"):
        model.append(f"XSA last {h['xsa_last_n']}")
    if h.get("recur_layers"):  # logs of the PR #1285-style versions
        model.append(f"depth recurrence (layers {h['recur_layers']})")
    if h.get("num_loops") not in (None, "0"):
        model.append(f"loop layers {h.get('loop_start')}-{h.get('loop_end')} x{int(h['num_loops']) + 1}")
    if h.get("parallel_start_layer") not in (None, "0"):
        model.append(f"parallel residuals from layer {h['parallel_start_layer']}")
    if h.get("smear_gate_enabled") == "True":
        model.append("SmearGate")
    if h.get("sparse_attn_gate_enabled") == "True":
        model.append("sparse attention gate")
    if h.get("ema_decay"):
        model.append(f"EMA {h['ema_decay']}")
    quant = "GPTQ int6"
    if h.get("gptq_clip") == "sdclip" and h.get("gptq_sigmas"):  # logs before per-group sigmas
        quant += f" (SDClip {h['gptq_sigmas']} sigma)"
    elif h.get("gptq_clip") == "sdclip" and h.get("mlp_clip_sigmas"):
        quant += (f" (SDClip MLP {h['mlp_clip_sigmas']}, attention {h.get('attn_clip_sigmas')} sigma)"
                  f" + int{h.get('embed_bits', '8')} embedding ({h.get('embed_clip_sigmas')} sigma)")
        if h.get("lqer_enabled") == "True":
            quant += f" + LQER rank {h.get('lqer_rank')} on {h.get('lqer_top_k')} tensors"
    elif h.get("gptq_clip"):
        quant += f" ({h['gptq_clip']} clip)"
    if r.compressor:
        quant += f" + {r.compressor}"
    uses = eval_uses([x for x in runs if x.final_metric])
    ev = []
    if any(uses[k] for k in ("ttt", "etlb", "ngram")) or "sliding_window" in (r.final_metric or ""):
        ev.append(f"sliding window (stride {h['eval_stride']})" if h.get("eval_stride") else "sliding window")
    if uses["ttt"]:
        ttt = ", ".join(x for x in (f"{h['ttt_epochs']} epochs" if h.get("ttt_epochs") else "",
                                    f"lr {h['ttt_lr']}" if h.get("ttt_lr") else "") if x)
        ev.append("score-first TTT" + (f" (SGD, {ttt})" if ttt else ""))
    if uses["etlb"]:
        ev.append("ETLB")
    if uses["ngram"]:
        ev.append("prefix n-gram tilt")
    if uses["pre_quant_ttt"]:
        ev.append("pre-quant TTT (not leaderboard-legal)")
    parts = [", ".join(model), quant]
    if ev:
        parts.append("eval: " + " + ".join(ev))
    return "; ".join(p for p in parts if p)


def build_submission(runs: list[RunLog], *, author: str, github_id: str, name: str, blurb: str, date: str,
                     hardware: str | None, track: str = "10min_16mb", technique: str | None = None) -> dict:
    """submission.json with the field names of the official records (records/track_10min_16mb/*/):
    per seed artifact_bytes (code + compressed model), top level bytes_total / artifact_bytes_max, ..."""
    scored = [r for r in runs if r.final_bpb is not None]
    m, s, n = mean_std([r.final_bpb for r in runs])
    lm, ls, _ = mean_std([r.final_loss for r in runs])
    totals = [r.total_bytes for r in runs if r.total_bytes is not None]
    codes = [r.code_bytes for r in runs if r.code_bytes is not None]
    trains = [r.train_s for r in runs]
    evals = [r.eval_s for r in runs]
    metrics = sorted({r.final_metric for r in scored})
    ws = sorted({r.world_size for r in runs if r.world_size is not None})
    if hardware is None:
        gpu = next((r.gpus[0] for r in runs if r.gpus), None)
        hardware = (f"{ws[0]}x{gpu}" if gpu and len(ws) == 1 else
                    ", ".join(f"world_size {w}" for w in ws) or "unknown")
    torch_versions = sorted({r.torch_version for r in runs if r.torch_version})

    def all_true(vals):
        return bool(vals) and all(v is True for v in vals) and len(vals) == len(runs)

    def pre_quant_bpb(r: RunLog) -> float | None:
        sc = r.scores.get("pre_quant")
        return sc.val_bpb if sc else None

    def step_avg_ms(r: RunLog) -> float | None:
        return _r(1000 * r.train_only_s / r.steps, 2) if r.train_only_s is not None and r.steps else None

    seed_results = {}
    for r in runs:
        legal, why = r.legality()
        seed_results[r.label] = {
            "val_bpb": r.final_bpb, "val_loss": r.final_loss, "pre_quant_val_bpb": pre_quant_bpb(r),
            "artifact_bytes": r.total_bytes, "bytes_model_compressed": r.model_bytes, "bytes_code": r.code_bytes,
            "steps": r.steps, "step_avg_ms": step_avg_ms(r), "train_time_s": r.train_s, "eval_time_s": r.eval_s,
            "metric": r.final_metric, "world_size": r.world_size, "legal": legal == "yes", "status": r.status,
            "log": r.name,
        }
        if legal != "yes":
            seed_results[r.label]["not_legal_because"] = why
        if r.eval_ablations and r.eval_s is not None:
            seed_results[r.label]["eval_time_s_without_ablations"] = _r(r.eval_without_ablations_s, 1)
    uses = eval_uses(scored)
    problems = [f"seed {r.label}: {r.status}: {p}" for r in runs for p in r.problems] + cross_checks(runs)[0]
    return {
        "author": author,
        "github_id": github_id,
        "name": name,
        "blurb": blurb,
        "date": date,
        "track": track,
        "val_bpb": _r(m),
        "val_bpb_std": _r(s),
        "val_loss": _r(lm),
        "val_loss_std": _r(ls),
        "val_bpb_n": n,
        "val_bpb_metric": metrics[0] if len(metrics) == 1 else metrics,
        "pre_quant_val_bpb": _mean([pre_quant_bpb(r) for r in runs]),
        "seeds": [r.seed if r.seed is not None else r.label for r in runs],
        "seed_results": seed_results,
        "artifact_bytes_mean": round(statistics.mean(totals)) if totals else None,
        "artifact_bytes_max": max(totals) if totals else None,
        "bytes_total": max(totals) if totals else None,
        "bytes_code": max(codes) if codes else None,
        "train_steps_mean": _mean([r.steps for r in runs], 2),
        "step_avg_ms_mean": _mean([step_avg_ms(r) for r in runs], 2),
        "train_time_s_mean": _mean(trains, 2),
        "eval_time_s_mean": _mean(evals, 2),
        "hardware": hardware,
        "world_size": ws[0] if len(ws) == 1 else ws,
        "pytorch_version": torch_versions[0] if len(torch_versions) == 1 else torch_versions,
        "technique_summary": technique_summary(runs) if technique is None else technique,
        "compliance": {
            "train_under_600s": all_true([t is not None and t <= TIME_LIMIT_S for t in trains]),
            "artifact_under_16mb": all_true([r.fits for r in runs]),
            "eval_under_600s": all_true([e is not None and e <= TIME_LIMIT_S for e in evals]),
            "times_measured_on_8_gpus": ws == [8],
            "score_first_ttt": uses["ttt"],
            "no_etlb": not uses["etlb"],
            "ngram_tilt": uses["ngram"],
            "no_pre_quant_ttt": not any(r.pre_quant_ttt for r in runs),
            "three_seeds": len({r.seed for r in scored}) >= 3,
            "all_seeds_legal": all(r.legality()[0] == "yes" for r in runs) and bool(runs),
            "artifact_bytes_max": max(totals) if totals else None,
            "train_time_max_s": max((t for t in trains if t is not None), default=None),
            "eval_time_max_s": max((e for e in evals if e is not None), default=None),
            "cap_bytes": CAP_BYTES,
            "problems": problems,
        },
        "generated_by": "tools/summarize_logs.py",
    }


def write_records_dir(out: Path, runs: list[RunLog], markdown: str, submission: dict, *, script: Path,
                      requirements: Path, repro: str | None, force: bool, pack: bool) -> list[str]:
    """Assemble a records/track_10min_16mb-style folder; returns notes about the copied code."""
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: {out} exists and is not empty (pass --force to overwrite its files)")
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    for r in runs:
        if r.exists:
            shutil.copyfile(r.path, out / f"train_seed{r.label}.log")
    if pack:
        res = subprocess.run([sys.executable, str(script), "--pack", str(out / "train_gpt.py")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"error: `{script} --pack` failed:\n{res.stdout}")
    else:
        shutil.copyfile(script, out / "train_gpt.py")
    if requirements.is_file():
        shutil.copyfile(requirements, out / "requirements.txt")
    else:
        notes.append(f"no requirements.txt copied ({requirements} does not exist)")
    size = (out / "train_gpt.py").stat().st_size
    codes = {r.code_bytes for r in runs if r.code_bytes is not None}
    if codes and size not in codes:
        notes.append(f"train_gpt.py here is {size:,} bytes but the logs counted {sorted(codes)} code bytes "
                     + ("(the self-extracting LZMA wrapper; --pack writes that wrapper as train_gpt.py)"
                        if not pack else "(the code differs from the code that ran)"))
    (out / "submission.json").write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
    readme = [markdown.rstrip(), ""]
    if notes:
        readme += ["## Files", ""] + [f"- {n}" for n in notes] + [""]
    if not repro:
        readme += ["## Reproduction", "", "```bash",
                   "SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py", "```", ""]
    (out / "README.md").write_text("\n".join(readme), encoding="utf-8")
    return notes


def code_check(runs: list[RunLog], script: Path) -> list[str]:
    """Problems: the script to copy is not the source the logs recorded."""
    if not script.is_file():
        return [f"{script} does not exist: nothing to copy as train_gpt.py"]
    text = script.read_text(encoding="utf-8").rstrip("\n")
    bad = [r.label for r in runs if r.source_lines and "\n".join(r.source_lines).rstrip("\n") != text]
    if bad:
        return [f"{script} is not the source recorded in the log(s) of seed(s) {', '.join(bad)}: the folder would "
                "not hold the code that produced these logs (use --code-from-log, or pass --script)"]
    return []


# =============================================================================
# CLI
# =============================================================================

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="train_gpt.py logs (logs/$RUN_ID.txt), one per seed")
    ap.add_argument("--out", help="also write the Markdown here")
    ap.add_argument("--submission", help="write submission.json here")
    ap.add_argument("--records-dir", help="assemble a records-style folder here (README.md, submission.json, "
                                          "train_seed<S>.log, train_gpt.py, requirements.txt)")
    ap.add_argument("--author", default="")
    ap.add_argument("--github-id", default="")
    ap.add_argument("--name", default="", help="submission name (also the Markdown title)")
    ap.add_argument("--blurb", default="")
    ap.add_argument("--date", help="YYYY-MM-DD (default: the latest date nvidia-smi printed in the logs, else today)")
    ap.add_argument("--hardware", help="hardware string (default: world_size x GPU name from nvidia-smi in the log)")
    ap.add_argument("--track", default="10min_16mb")
    ap.add_argument("--technique-summary", help="submission.json technique_summary (default: one line made from "
                                                "the first log's hyperparameters and the final metric)")
    ap.add_argument("--script", default=str(REPO / "train_gpt.py"),
                    help="train_gpt.py to copy into --records-dir and to read defaults from")
    ap.add_argument("--requirements", default=str(REPO / "requirements.txt"))
    ap.add_argument("--code-from-log", action="store_true",
                    help="--records-dir: write the source recorded in the logs as train_gpt.py")
    ap.add_argument("--pack", action="store_true",
                    help="--records-dir: write train_gpt.py as the self-extracting wrapper (`train_gpt.py --pack`)")
    ap.add_argument("--force", action="store_true", help="--records-dir may already hold files")
    ap.add_argument("--allow-problems", action="store_true", help="exit 0 even if some log has problems")
    a = ap.parse_args(argv)

    runs = [parse_log(p) for p in a.logs]
    if a.date is None:
        a.date = max((r.run_date for r in runs if r.run_date), default=datetime.date.today().isoformat())
    command = shlex.join(["python3", "tools/summarize_logs.py", *argv])
    script = Path(a.script)
    extra_problems: list[str] = []
    tmp_script = None
    if a.records_dir:
        if a.code_from_log:
            sources = {"\n".join(r.source_lines) for r in runs if r.source_lines}
            if len(sources) != 1:
                raise SystemExit(f"error: --code-from-log needs one source in the logs; found {len(sources)}")
            tmp_script = Path(a.records_dir).with_name(Path(a.records_dir).name + ".train_gpt.tmp.py")
            tmp_script.parent.mkdir(parents=True, exist_ok=True)
            tmp_script.write_text(sources.pop().rstrip("\n") + "\n", encoding="utf-8")
            script = tmp_script
        else:
            extra_problems = code_check(runs, script)
    title = a.name or "train_gpt.py results"
    repro = reproduction(runs, script)
    md = render_markdown(runs, command, title, repro, extra_problems=extra_problems)
    print(md)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md, encoding="utf-8")
    sub = build_submission(runs, author=a.author, github_id=a.github_id, name=a.name, blurb=a.blurb,
                           date=a.date, hardware=a.hardware, track=a.track,
                           technique=a.technique_summary)
    sub["compliance"]["problems"] += extra_problems
    if a.submission:
        Path(a.submission).parent.mkdir(parents=True, exist_ok=True)
        Path(a.submission).write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
    if a.records_dir:
        try:
            notes = write_records_dir(Path(a.records_dir), runs, md, sub, script=script,
                                      requirements=Path(a.requirements), repro=repro, force=a.force, pack=a.pack)
        finally:
            if tmp_script is not None:
                tmp_script.unlink(missing_ok=True)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        print(f"wrote {a.records_dir}/", file=sys.stderr)
    if has_problems(runs, extra_problems):
        n = sum(bool(r.problems) for r in runs)
        msg = f"{n} of {len(runs)} log(s) have problems" + ("" if n else "; the logs disagree with each other")
        msg += " (see Problems above)"
        if a.allow_problems:
            print(f"warning: {msg}; exit 0 because of --allow-problems", file=sys.stderr)
            return 0
        print(f"error: {msg}; pass --allow-problems to exit 0 anyway", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
