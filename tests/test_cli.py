"""MAIN and the shape of train_gpt.py: --help, argument errors, the CPU preflight, the warnings a
small run prints, and the file's layout rules. Run: python3 -m pytest -q tests/test_cli.py"""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
SECTIONS = ["CONFIG", "RUNTIME", "DATA AND METRIC", "MODEL", "OPTIMIZER", "TRAINING", "QUANTIZATION", "ARTIFACT",
            "EVALUATION", "ADAPTATION", "MAIN"]


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["DATA_DIR"] = str(tmp_path / "no_data_here") + "/"
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_exits_0_without_touching_data(tmp_path, flag):
    r = _cli(tmp_path, flag)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage:") and "README.md" in r.stdout and "MAX_WALLCLOCK_SECONDS" in r.stdout
    assert "scripts/demo_cpu.py" in r.stdout
    assert not (tmp_path / "logs").exists() and r.stderr == ""


@pytest.mark.parametrize("args", [["--helpp"], ["train"], ["--pack"], ["--pack", "a.py", "b.py"]])
def test_unknown_or_malformed_arguments_are_errors(tmp_path, args):
    r = _cli(tmp_path, *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "usage:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "logs").exists()


def test_default_size_run_on_cpu_is_refused_before_it_starts(monkeypatch):
    monkeypatch.setattr(tg, "available_memory_bytes", lambda: 24 * 2**30)
    with pytest.raises(tg.ConfigError, match=r"needs about \d+ GiB .* 24 GiB is available.*demo_cpu"):
        tg.preflight(tg.Hyperparameters(), tg.Runtime.single())
    tg.preflight(TINY, tg.Runtime.single())  # a tiny config passes
    monkeypatch.setattr(tg, "available_memory_bytes", lambda: None)  # unknown memory: no refusal
    tg.preflight(tg.Hyperparameters(), tg.Runtime.single())


def test_default_size_run_on_cpu_exits_with_the_reason(tmp_path):
    """The CLI end to end on this CPU machine: the default config stops at once, with a reason."""
    if tg.available_memory_bytes() is None or tg.available_memory_bytes() > tg.cpu_memory_estimate(tg.Hyperparameters()):
        pytest.skip("this machine has the memory for the default configuration")
    r = _cli(tmp_path)
    assert r.returncode == 1 and "needs about" in r.stdout and "Traceback" not in r.stderr
    log = next((tmp_path / "logs").glob("*.txt")).read_text()
    assert "error: ConfigError: this configuration needs about" in log


def test_cpu_time_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "available_memory_bytes", lambda: 10.0 * 2**40)
    log = tmp_path / "log.txt"
    tg.configure_logging(str(log), True)
    try:
        tg.preflight(tg.Hyperparameters(), tg.Runtime.single())
        tg.preflight(TINY, tg.Runtime.single())
    finally:
        tg.configure_logging(None, False)
    assert log.read_text().count("warning: on the CPU this run needs roughly") == 1  # the default, not TINY


def test_ema_warning():
    assert tg.ema_warning(0.997, 50) is not None and "EMA_DECAY=0.997" in tg.ema_warning(0.997, 50)
    assert "86%" in tg.ema_warning(0.997, 50)  # 0.997**50 of the average is still the init
    assert tg.ema_warning(0.997, 20000) is None and tg.ema_warning(0.93, 241) is None
    assert tg.ema_warning(0.0, 1) is None


def test_quantizer_warns_when_nothing_is_large_enough(tmp_path, rt_cpu):
    h = dataclasses.replace(TINY, vocab_size=64, quant_min_numel=10**9)
    model = tg.build_model(h, rt_cpu)
    log = tmp_path / "log.txt"
    tg.configure_logging(str(log), True)
    try:
        tensors, meta = tg.Quantizer(h, rt_cpu, model.state_dict(), {}).quantize()
    finally:
        tg.configure_logging(None, False)
    text = log.read_text()
    assert "warning: no attention/MLP matrix has more than QUANT_MIN_NUMEL=1000000000" in text
    assert "int6:0" in text and not any(m["type"] == "int6" for m in meta.values())


def test_progress_is_due_every_30_seconds():
    now = [0.0]
    clk = tg._LoopClock(lambda: now[0], torch.device("cpu"))
    due = []
    for t in range(0, 100):
        now[0] = float(t)
        due.append(clk.progress_due())
        if due[-1] or t == 45:  # a line is logged (t=45: a regular step line restarts the wait)
            clk.mark_progress()
    assert [t for t, d in enumerate(due) if d] == [30, 75]


def test_throughput_uses_one_definition():
    h = TINY
    assert tg.tok_per_s(10, 2000.0, h) == pytest.approx(10 * h.train_batch_tokens / 2.0)
    assert tg.tok_per_s(0, 0.0, h) == 0.0


def test_typo_warnings_reach_the_log_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(DATA_DIR=str(tmp_path / "none") + "/", NUM_LAYER="3", TTT_OPTIMIZER="muon", RUN_ID="typo",
               TRAIN_BATCH_TOKENS="8192", TRAIN_SEQ_LEN="128", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
               NUM_KV_HEADS="2", ROPE_DIMS="8", VE_LAYERS="", NUM_LOOPS="0", PARALLEL_START_LAYER="0", XSA_LAST_N="2")
    r = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1  # no data: a DataError, after the warnings
    log = (tmp_path / "logs" / "typo.txt").read_text()
    assert "NUM_LAYER is not a setting; did you mean NUM_LAYERS?" in log
    assert "TTT_OPTIMIZER is no longer a setting" in log
    assert "error: DataError: tokenizer" in log


def test_no_function_is_longer_than_60_lines():
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_sections_are_in_pipeline_order():
    text = SCRIPT.read_text(encoding="utf-8")
    headers = re.findall(r"^# =+\n# ([A-Z][A-Z ]+)\n", text, flags=re.M)
    assert headers == SECTIONS
    assert "STAGE_SECONDS" not in text  # stage timing has one owner, StageTimer


def test_stage_timer_records_and_sums_evaluation(tmp_path):
    t = tg.StageTimer(torch.device("cpu"))
    with t.stage("a"):
        pass
    with t.stage("b", evaluation=True, quiet=True) as lap:
        sum(range(1000))
    with t.stage("b", evaluation=True):
        pass
    assert set(t.seconds) == {"a", "b"} and lap.seconds >= 0
    assert t.eval_seconds == pytest.approx(t.seconds["b"])


def test_readme_is_the_user_document():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 312  # 300, plus the 11 LoRA TTT settings and their compliance row
    assert lines.index("## Quickstart") < 60
    ci_test_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_test_command in lines  # CI runs exactly the README's test command
    for path in ("requirements.txt", "requirements-dev.txt", "scripts/demo_cpu.py", "data/cached_challenge_fineweb.py",
                 "tools/run_seeds.py", "tools/summarize_logs.py", "docs/BENCH.md", "docs/EXPERIMENTS.md"):
        assert path in "\n".join(lines) and (REPO / path).exists(), path
