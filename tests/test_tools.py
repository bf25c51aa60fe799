"""tools/run_seeds.py and tools/summarize_logs.py on logs of real tiny CPU runs of train_gpt.py
(made once per test run, by the runner itself) and on hand-made logs in tests/fixtures_logs/
(both score-line formats: `legal:` on every score line, and the `legality:` line); scripts/*.sh.

    python3 -m pytest -q tests/test_tools.py        (~1 min on 2 CPU cores)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
FIXTURES = Path(__file__).resolve().parent / "fixtures_logs"
BENCH = REPO / "logs" / "bench"
sys.path.insert(0, str(TOOLS))

import run_seeds as rs  # noqa: E402
import summarize_logs as sl  # noqa: E402
from conftest import TINY  # noqa: E402

SEP = "=" * 100
SEEDS = (11, 22, 33)
slow = pytest.mark.slow  # needs the tiny train_gpt.py runs (subprocesses, ~50 s in all)


# =============================================================================
# helpers
# =============================================================================

def tiny_env(data_dir: Path, vocab: int) -> dict[str, str]:
    """os.environ plus the tiny config as environment variables (bools as 0/1)."""
    h = dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab)
    env = dict(os.environ)
    for f in dataclasses.fields(h):
        v = getattr(h, f.name)
        env[f.name.upper()] = str(int(v)) if isinstance(v, bool) else str(v)
    env.pop("RUN_ID"), env.pop("SEED")
    env["OMP_NUM_THREADS"] = "1"  # 2 threads on 2 busy cores can be 8x slower
    return env


def runner(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / "run_seeds.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def body(path: Path) -> list[str]:
    """The lines after the header (the header holds the source code), read independently of the tool."""
    return path.read_text().split(SEP + "\n")[-1].splitlines()


def hparam(path: Path, name: str) -> str:
    """A `  name: value` line of the header's hyperparameter list."""
    for line in path.read_text().splitlines():
        if line.startswith("world_size: "):
            break
        if line.startswith(f"  {name}: "):
            return line.split(": ", 1)[1]
    raise AssertionError(name)


def grab(path: Path, prefix: str) -> str:
    hits = [line for line in body(path) if line.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


def field_of(line: str, key: str) -> str:
    """'... key:VALUE ...' -> VALUE."""
    return re.search(rf"(?:^| ){re.escape(key)}:(\S+)", line).group(1)


def table(md: str, first_header: str) -> list[dict[str, str]]:
    """Rows of the Markdown table whose header row starts with `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")])))
    return rows


def scores_rows(md: str) -> dict[str, dict[str, str]]:
    return {r["seed"]: r for r in table(md, "| seed | status |")}


def budget_rows(md: str) -> dict[str, dict[str, str]]:
    return {r["seed"]: r for r in table(md, "| seed | log |")}


def summarize(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = sl.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def edit(text: str, pattern: str, repl: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == 1, pattern
    return new


def with_total(text: str, total: int, verdict: str | None = None) -> str:
    """A log with its artifact lines changed to a given total (model = total - code)."""
    code = int(re.search(r"^Code size: (\d+) bytes", text, re.M).group(1))
    text = edit(text, r"^Serialized model int6\+(\w+): \d+ bytes$", rf"Serialized model int6+\1: {total - code} bytes")
    text = edit(text, r"^Total submission size int6\+(\w+): \d+ bytes$",
                rf"Total submission size int6+\1: {total} bytes")
    verdict = verdict or f"artifact: fits total:{total} limit:16000000 margin:{16_000_000 - total}"
    return edit(text, r"^artifact: fits .*$", verdict)


# =============================================================================
# fixtures: real tiny runs through the runner (once per test run)
# =============================================================================

@pytest.fixture(scope="session")
def env(dataset) -> dict[str, str]:
    return tiny_env(*dataset)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_runs(env, workdir) -> tuple[list[Path], subprocess.CompletedProcess]:
    """Three seeds of the legal default (score-first TTT + ETLB), run by tools/run_seeds.py --python."""
    res = runner(["--python", "--seeds", ",".join(map(str, SEEDS)), "--prefix", "tiny", "--workdir", str(workdir),
                  "ITERATIONS=4", "TTT_EPOCHS=1", "WARMUP_STEPS=0"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    return [workdir / "logs" / f"tiny_seed{s}.txt" for s in SEEDS], res


@pytest.fixture(scope="session")
def prequant_log(env, workdir) -> Path:
    """PRE_QUANT_TTT=1 (not leaderboard-legal), TTT off so the final metric is sliding+ETLB."""
    res = runner(["--python", "--seeds", "44", "--prefix", "pq", "--workdir", str(workdir),
                  "ITERATIONS=4", "WARMUP_STEPS=0", "PRE_QUANT_TTT=1", "TTT_ENABLED=0", "NGRAM_TILT=0"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    return workdir / "logs" / "pq_seed44.txt"


@pytest.fixture(scope="session")
def summary(tiny_runs, tmp_path_factory) -> tuple[str, dict, list[Path]]:
    logs, _ = tiny_runs
    out = tmp_path_factory.mktemp("summary")
    rc = sl.main([*map(str, logs), "--out", str(out / "RESULTS.md"), "--submission", str(out / "submission.json"),
                  "--author", "tester", "--github-id", "tester-gh", "--name", "Tiny", "--blurb", "tiny CPU runs",
                  "--date", "2026-01-02"])
    assert rc == 0
    return (out / "RESULTS.md").read_text(), json.loads((out / "submission.json").read_text()), logs


# =============================================================================
# runner
# =============================================================================

@slow
def test_runner_ran_every_seed(tiny_runs):
    logs, res = tiny_runs
    for seed, log in zip(SEEDS, logs):
        assert log.is_file()
        assert hparam(log, "seed") == str(seed) and hparam(log, "run_id") == f"tiny_seed{seed}"
        assert re.search(rf"^run_seeds: seed {seed} done in \d+s: final_int6_ttt_etlb_ngram val_bpb:\S+ legal:yes",
                         res.stdout, re.M)
        # every run got the same settings: the VAR=VALUE arguments and the environment
        assert hparam(log, "iterations") == "4" and hparam(log, "ttt_epochs") == "1"
        assert hparam(log, "num_layers") == str(TINY.num_layers)
    assert "python3 tools/summarize_logs.py" in res.stdout


def test_runner_dry_run(tmp_path, capsys):
    rc = rs.main(["--dry-run", "--prefix", "p", "--workdir", str(REPO), "NUM_LAYERS=9"])
    out = capsys.readouterr().out
    assert rc == 0
    cmds = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(cmds) == 3
    for seed, line in zip((1337, 42, 2025), cmds):
        assert f"SEED={seed} RUN_ID=p_seed{seed} NUM_LAYERS=9 torchrun --standalone --nproc_per_node=8 " \
               f"train_gpt.py" in line
    assert "python3 tools/summarize_logs.py" in out
    rc = rs.main(["--dry-run", "--python", "--seeds", "7", "--prefix", "q", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"SEED=7 RUN_ID=q_seed7 python3 \S*train_gpt\.py", out)
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_runner_rejects_bad_arguments(capsys):
    assert rs.main(["--dry-run", "NUM_LAYER=3"]) == 2
    assert "did you mean NUM_LAYERS" in capsys.readouterr().err
    assert rs.main(["--dry-run", "SEED=3"]) == 2
    assert "set per run by the runner" in capsys.readouterr().err
    assert rs.main(["--dry-run", "--seeds", "1,1"]) == 2
    assert rs.main(["--dry-run", "--nproc", "3"]) == 2
    assert rs.main(["--dry-run", "notanassignment"]) == 2


def test_runner_refuses_settings_the_script_does_not_have(tmp_path, capsys):
    script = tmp_path / "train_gpt.py"
    script.write_text("class Hyperparameters:\n    seed: int = 1\n    run_id: str = ''\n    ttt_lr: float = 0.005\n")
    base = ["--dry-run", "--script", str(script), "--prefix", "p", "--seeds", "1"]
    # a removed setting would be ignored by the runs: refused, not passed
    assert rs.main([*base, "TTT_OPTIMIZER=muon"]) == 2
    err = capsys.readouterr().err
    assert "TTT_OPTIMIZER is not a setting of train_gpt.py" in err and "--no-check" in err
    assert rs.main([*base, "TTT_LR=0.01", "NCCL_DEBUG=INFO"]) == 0  # settings and pass-through variables
    assert "TTT_LR=0.01 NCCL_DEBUG=INFO" in capsys.readouterr().out
    assert rs.main([*base, "--no-check", "TTT_OPTIMIZER=muon"]) == 0
    assert "TTT_OPTIMIZER=muon" in capsys.readouterr().out


@slow
def test_runner_refuses_to_append_to_an_existing_log(tiny_runs, workdir, env):
    res = runner(["--python", "--seeds", str(SEEDS[0]), "--prefix", "tiny", "--workdir", str(workdir)], env)
    assert res.returncode == 2
    assert "already exist" in res.stderr and f"tiny_seed{SEEDS[0]}.txt" in res.stderr


@slow
def test_runner_stops_on_a_config_error(env, workdir):
    res = runner(["--python", "--seeds", "55,66", "--prefix", "bad", "--workdir", str(workdir), "NUM_LAYERS=abc"], env)
    assert res.returncode == 1
    err = res.stderr
    assert "FAILED at seed 55 (run 1 of 2)" in err and "exited with code 2" in err
    assert "bad_seed55.txt: not written" in err
    assert "NUM_LAYERS='abc' is not an integer" in err  # the run's own message, in the output tail
    assert "not run: 66" in err
    assert not (workdir / "logs" / "bad_seed66.txt").exists()  # the series stopped


@slow
def test_runner_stops_on_a_logged_error(env, workdir, tmp_path):
    res = runner(["--python", "--seeds", "77", "--prefix", "nodata", "--workdir", str(workdir),
                  f"DATA_DIR={tmp_path}/"], env)
    assert res.returncode == 1
    assert "FAILED at seed 77" in res.stderr
    assert re.search(r"log \S*nodata_seed77\.txt says: error: DataError: tokenizer", res.stderr)


def test_runner_stops_when_the_log_has_no_final_score(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text("import os\nos.makedirs('logs', exist_ok=True)\n"
                    "open(f\"logs/{os.environ['RUN_ID']}.txt\", 'w').write("
                    "'Hyperparameters:\\n  seed: 1\\nworld_size: 1 grad_accum_steps: 8 device: cpu attention: sdpa\\n"
                    "1/10 train_loss: 5.0000 train_time: 0.0m tok/s: 100\\n')\nprint('pretending to be done')\n")
    res = runner(["--python", "--script", str(fake), "--seeds", "8,9", "--prefix", "fake", "--workdir", str(tmp_path)])
    assert res.returncode == 1
    err = res.stderr
    assert "FAILED at seed 8 (run 1 of 2)" in err and "exited with code 0" in err
    assert "fake_seed8.txt has no final_score line" in err and "during training" in err
    assert "not run: 9" in err


# =============================================================================
# summarizer on the tiny runs
# =============================================================================

@slow
def test_table_values_are_what_the_logs_printed(summary):
    md, _, logs = summary
    scores, budget = scores_rows(md), budget_rows(md)
    for seed, log in zip(SEEDS, logs):
        s, b = scores[str(seed)], budget[str(seed)]
        final = grab(log, "final_score metric:")
        assert s["status"] == "ok" and s["final metric"] == field_of(final, "metric") == "final_int6_ttt_etlb_ngram"
        assert s["final val_bpb"] == field_of(final, "val_bpb")
        assert s["final val_loss"] == field_of(grab(log, "final_int6_ttt_etlb_ngram val_loss:"), "val_loss")
        for label, col in (("final_int6_ttt_etlb_ngram", "TTT+ETLB+ngram"), ("final_int6_sliding_window", "sliding"),
                           ("final_int6_roundtrip", "roundtrip"), ("pre-quantization post-ema", "pre-quant (EMA)")):
            assert s[col] == field_of(grab(log, label + " val_loss:"), "val_bpb"), col
        assert "score-first TTT" not in s and "sliding+ETLB" not in s  # not run without EVAL_ABLATIONS
        total = grab(log, "Total submission size int6+brotli:").split()[-2]
        assert b["total bytes"].replace(",", "") == total
        assert b["model bytes"].replace(",", "") == grab(log, "Serialized model int6+brotli:").split()[-2]
        assert b["code bytes"].replace(",", "") == grab(log, "Code size:").split()[2]
        assert b["margin bytes"].replace(",", "") == str(16_000_000 - int(total))
        assert b["fits ≤ 16,000,000"] == "yes"
        assert b["train s (limit 600)"] == field_of(grab(log, "train_budget:"), "total").rstrip("s")
        assert b["eval s (limit 600)"] == grab(log, "eval_time_total:").split()[1].rstrip("s")
        assert b["world_size"] == "1" and b["steps"] == "4"
        assert b["legal"] == "yes"
    assert "## Problems\n\nNone" in md


@slow
def test_mean_and_sample_std(summary):
    md, sub, logs = summary
    scores, budget = scores_rows(md), budget_rows(md)
    bpb = [float(field_of(grab(log, "final_score metric:"), "val_bpb")) for log in logs]
    sliding = [float(field_of(grab(log, "final_int6_sliding_window val_loss:"), "val_bpb")) for log in logs]
    totals = [int(grab(log, "Total submission size").split()[-2]) for log in logs]
    trains = [float(field_of(grab(log, "train_budget:"), "total").rstrip("s")) for log in logs]
    assert scores["**mean**"]["final val_bpb"] == f"{statistics.mean(bpb):.8f}"
    assert scores["**std (n-1)**"]["final val_bpb"] == f"{statistics.stdev(bpb):.8f}"
    assert scores["n"]["final val_bpb"] == "3"
    assert scores["**mean**"]["sliding"] == f"{statistics.mean(sliding):.8f}"
    assert scores["**std (n-1)**"]["sliding"] == f"{statistics.stdev(sliding):.8f}"
    assert budget["**mean**"]["total bytes"] == f"{statistics.mean(totals):,.1f}"
    assert budget["**std (n-1)**"]["total bytes"] == f"{statistics.stdev(totals):,.1f}"
    assert budget["**mean**"]["train s (limit 600)"] == f"{statistics.mean(trains):,.1f}"
    assert sub["val_bpb"] == round(statistics.mean(bpb), 8)
    assert sub["val_bpb_std"] == round(statistics.stdev(bpb), 8)
    assert sl.mean_std([1.0, None, 3.0]) == (2.0, statistics.stdev([1.0, 3.0]), 2)
    assert sl.mean_std([5.0]) == (5.0, None, 1)


@slow
def test_submission_json(summary):
    md, sub, logs = summary
    assert (sub["author"], sub["github_id"], sub["name"], sub["blurb"], sub["date"]) == \
        ("tester", "tester-gh", "Tiny", "tiny CPU runs", "2026-01-02")
    assert sub["track"] == "10min_16mb" and sub["val_bpb_metric"] == "final_int6_ttt_etlb_ngram"
    assert sub["seeds"] == list(SEEDS)
    totals = {}
    for seed, log in zip(SEEDS, logs):
        r = sub["seed_results"][str(seed)]
        assert r["val_bpb"] == float(field_of(grab(log, "final_score metric:"), "val_bpb"))
        assert r["val_loss"] == float(field_of(grab(log, "final_int6_ttt_etlb_ngram val_loss:"), "val_loss"))
        totals[seed] = int(grab(log, "Total submission size").split()[-2])
        # the records' names: artifact_bytes (code + compressed model), bytes_model_compressed, bytes_code
        assert "bytes_total" not in r and r["artifact_bytes"] == totals[seed]
        assert r["bytes_model_compressed"] == int(grab(log, "Serialized model int6+brotli:").split()[-2])
        assert r["bytes_code"] == int(grab(log, "Code size:").split()[2])
        assert r["pre_quant_val_bpb"] == float(field_of(grab(log, "pre-quantization post-ema"), "val_bpb"))
        budget = grab(log, "train_budget:")
        assert r["train_time_s"] == float(field_of(budget, "total").rstrip("s"))
        assert r["steps"] == int(field_of(budget, "steps")) == 4
        assert r["step_avg_ms"] == round(1000 * float(field_of(budget, "train").rstrip("s")) / 4, 2)
        assert r["eval_time_s"] == float(grab(log, "eval_time_total:").split()[1].rstrip("s"))
        assert r["legal"] is True and r["world_size"] == 1
    assert sub["artifact_bytes_max"] == sub["bytes_total"] == max(totals.values())
    assert sub["artifact_bytes_mean"] == round(statistics.mean(totals.values()))
    assert sub["bytes_code"] == max(int(grab(log, "Code size:").split()[2]) for log in logs)
    assert sub["pre_quant_val_bpb"] == round(statistics.mean(
        sub["seed_results"][str(s)]["pre_quant_val_bpb"] for s in SEEDS), 8)
    assert sub["train_time_s_mean"] and sub["eval_time_s_mean"] and sub["step_avg_ms_mean"]
    t = sub["technique_summary"]
    assert f"{TINY.num_layers}L/{TINY.model_dim}d" in t and "GPTQ int6" in t and "brotli" in t
    assert "score-first TTT" in t and "ETLB" in t and "n-gram tilt" in t and "pre-quant" not in t
    losses = [sub["seed_results"][str(s)]["val_loss"] for s in SEEDS]
    assert sub["val_loss"] == round(statistics.mean(losses), 8)
    c = sub["compliance"]
    assert c["artifact_under_16mb"] and c["train_under_600s"] and c["eval_under_600s"]
    assert c["score_first_ttt"] and c["no_pre_quant_ttt"] and c["three_seeds"] and c["all_seeds_legal"]
    assert c["no_etlb"] is False and c["ngram_tilt"] is True
    assert c["times_measured_on_8_gpus"] is False and c["problems"] == []
    assert sub["pytorch_version"] and sub["hardware"] == "world_size 1"  # CPU: no nvidia-smi in the log


@slow
def test_source_code_in_the_log_is_not_parsed(tiny_runs):
    logs, _ = tiny_runs
    text = logs[0].read_text()
    assert 'log(f"final_score metric:' in text  # the source dump is there...
    r = sl.parse_text(text, str(logs[0]))
    assert r.source_lines and r.n_runs == 1 and r.status == "ok"
    # ...and the same values come out of a console capture (no header separators, no source)
    head, _, rest = text.partition("world_size: ")
    console = head.replace(SEP + "\n", "") + "world_size: " + rest.split("\n", 1)[0] + "\n" + "\n".join(body(logs[0]))
    c = sl.parse_text(console, "console")
    assert not c.source_lines and c.status == "ok"
    for attr in ("final_bpb_text", "total_bytes", "code_bytes", "train_text", "eval_text", "world_size", "seed"):
        assert getattr(c, attr) == getattr(r, attr), attr
    assert {k: v.bpb_text for k, v in c.scores.items()} == {k: v.bpb_text for k, v in r.scores.items()}


@slow
def test_every_truncation_is_a_problem(tiny_runs):
    log = tiny_runs[0][0]
    lines = log.read_text().splitlines(keepends=True)
    seps = [i for i, line in enumerate(lines) if line.rstrip("\n") == SEP]
    cuts = [1, 3, seps[0] + 5, seps[1] - 3, seps[1] + 2, *range(seps[2] + 1, len(lines))]
    for k in cuts:
        r = sl.parse_text("".join(lines[:k]), "cut.txt")
        assert r.status == ("NOT A LOG" if k < 2 else "TRUNCATED") and r.problems, (k, r.status)
        assert r.legality()[0] == "NO"
        assert r.final_bpb is None
    assert sl.parse_text("".join(lines), "full.txt").status == "ok"
    mid = next(i for i, line in enumerate(lines) if line.startswith("final_int6_sliding_window "))
    r = sl.parse_text("".join(lines[:mid + 1]), "cut.txt")
    assert "during evaluation (after final_int6_sliding_window)" in r.problems[0]


@slow
def test_a_reused_run_id_is_a_problem(tiny_runs):
    a, b = tiny_runs[0][:2]
    r = sl.parse_text(a.read_text() + b.read_text(), "appended.txt")
    assert r.n_runs == 2 and r.seed == SEEDS[1]
    assert r.final_bpb_text == field_of(grab(b, "final_score metric:"), "val_bpb")
    assert any("holds 2 runs" in p for p in r.problems)


# =============================================================================
# the 16,000,000-byte cap, legality, problems
# =============================================================================

@slow
def test_cap_is_decimal_and_inclusive(tiny_runs, tmp_path, capsys):
    text = tiny_runs[0][0].read_text()
    exact = sl.parse_text(with_total(text, 16_000_000), "exact.txt")
    assert exact.fits is True and exact.legality()[0] == "yes" and exact.problems == []
    # one byte over, while the log still claims it fits (the PR #1399 mistake): NOT fitting, not legal
    over_text = with_total(text, 16_000_001, "artifact: fits total:16000001 limit:16000000 margin:-1")
    over = sl.parse_text(over_text, "over.txt")
    assert over.fits is False and over.legality()[0] == "NO"
    assert any("says the artifact fits" in p for p in over.problems)
    (tmp_path / "over_seed5.txt").write_text(over_text)
    rc, out, err = summarize(capsys, [tmp_path / "over_seed5.txt"])
    row = budget_rows(out)[str(SEEDS[0])]
    assert rc == 1 and row["fits ≤ 16,000,000"] == "**NO**" and row["legal"] == "**NO**"
    assert row["margin bytes"] == "-1"


def test_hand_made_over_cap_logs(capsys):
    pr1399 = sl.parse_log(FIXTURES / "overcap_pr1399_seed101.txt")
    assert pr1399.total_bytes == 16_084_685 and pr1399.log_verdict[0] == "fits"
    assert pr1399.fits is False and pr1399.legality()[0] == "NO" and pr1399.status == "INCONSISTENT"
    # decoy lines inside the source-code region are ignored
    assert pr1399.final_bpb_text == "1.08150000" and pr1399.error is None
    exact = sl.parse_log(FIXTURES / "exactcap_seed102.txt")
    assert exact.total_bytes == 16_000_000 and exact.fits is True and exact.legality() == ("yes", [])
    by1 = sl.parse_log(FIXTURES / "overcap_by1_seed103.txt")
    assert by1.total_bytes == 16_000_001 and by1.fits is False and by1.problems == []
    assert by1.legality()[0] == "NO"
    rc, out, _ = summarize(capsys, [FIXTURES / n for n in
                                    ("exactcap_seed102.txt", "overcap_by1_seed103.txt", "overcap_pr1399_seed101.txt")])
    sub = sl.build_submission([exact, by1, pr1399], author="a", github_id="g", name="n", blurb="b",
                              date="2026-01-01", hardware=None)
    assert rc == 1  # the PR #1399 log is inconsistent
    rows = budget_rows(out)
    assert [rows[s]["fits ≤ 16,000,000"] for s in ("102", "103", "101")] == ["yes", "**NO**", "**NO**"]
    assert sub["compliance"]["artifact_under_16mb"] is False
    assert sub["artifact_bytes_max"] == sub["bytes_total"] == 16_084_685
    assert sub["seed_results"]["103"]["artifact_bytes"] == 16_000_001
    assert sub["hardware"] == "8xNVIDIA H100 80GB HBM3"
    assert sub["seed_results"]["102"]["legal"] is True and sub["seed_results"]["101"]["legal"] is False


@slow
def test_problem_logs_are_reported_not_skipped(summary, capsys):
    _, _, logs = summary
    fx = [FIXTURES / n for n in ("truncated_seed104.txt", "crashed_seed105.txt", "missing_total_seed106.txt")]
    missing = logs[0].parent / "never_written_seed107.txt"
    rc, out, err = summarize(capsys, [*logs, *fx, missing])
    assert rc == 1 and "--allow-problems" in err
    scores, budget = scores_rows(out), budget_rows(out)
    assert scores["104"]["final val_bpb"] == "TRUNCATED" and budget["104"]["total bytes"] == "TRUNCATED"
    assert scores["105"]["final val_bpb"] == "CRASHED" and budget["105"]["legal"] == "**NO**"
    assert scores["106"]["status"] == "INCOMPLETE" and budget["106"]["total bytes"] == "MISSING"
    assert budget["106"]["fits ≤ 16,000,000"] == "MISSING" and budget["106"]["legal"] == "**NO**"
    assert scores["107"]["status"] == "MISSING"
    problems = out.split("## Problems")[1].split("## Notes")[0]
    assert "seed 104" in problems and "during training (last logged step 4000/20000)" in problems
    assert "seed 105" in problems and "error: DataError: shard" in problems
    assert "seed 106" in problems and "Total submission size" in problems
    assert "seed 107" in problems and "does not exist" in problems
    assert scores["n"]["final val_bpb"] == "4"  # 3 tiny seeds + the 106 log (its scores are complete)
    rc, _, err = summarize(capsys, [*logs, *fx, "--allow-problems"])
    assert rc == 0 and "warning" in err


@slow
def test_duplicate_seed_is_a_problem(summary, capsys):
    _, _, logs = summary
    rc, out, _ = summarize(capsys, [logs[0], logs[1], logs[0]])
    assert rc == 1 and f"seed {SEEDS[0]} appears in 2 logs" in out


@slow
def test_pre_quant_ttt_is_not_legal(prequant_log, summary, capsys):
    r = sl.parse_log(prequant_log)
    assert r.status == "ok" and r.pre_quant_ttt and "pre_quant_ttt_scorefirst" in r.scores
    assert r.final_metric == "final_int6_sliding_window_etlb" and r.final_legal is False
    verdict, why = r.legality()
    assert verdict == "NO" and any("pre-quant TTT" in w for w in why)
    rc, out, _ = summarize(capsys, [prequant_log])
    row = scores_rows(out)["44"]
    assert rc == 0 and budget_rows(out)["44"]["legal"] == "**NO**"
    assert row["pre-quant TTT pass"] == field_of(grab(prequant_log, "pre_quant_ttt_scorefirst val_loss:"), "val_bpb")
    assert row["sliding+ETLB"] == row["final val_bpb"]
    _, _, logs = summary
    sub = sl.build_submission([sl.parse_log(p) for p in logs[:2]] + [r], author="", github_id="", name="",
                              blurb="", date="", hardware="x")
    assert sub["compliance"]["no_pre_quant_ttt"] is False and sub["compliance"]["all_seeds_legal"] is False
    assert sub["seed_results"]["44"]["legal"] is False


# =============================================================================
# score-line formats: `legal:` on every score line (older logs), or a `legality:` line (current)
# =============================================================================

NEW_LEGAL, NEW_PREQUANT, NEW_CONSOLE = (FIXTURES / n for n in (
    "newformat_legal_seed201.txt", "newformat_prequant_seed202.txt", "newformat_ablations_console_seed203.txt"))


@slow
def test_tiny_logs_say_legality_once(tiny_runs):
    for log in tiny_runs[0]:
        assert grab(log, "legality:") == "legality: legal:1"
        assert grab(log, "final_score ").endswith(" legal:1")
        r = sl.parse_log(log)
        assert r.legality_line == (True, "") and r.final_legal is True
        assert all(sc.legal is None for sc in r.scores.values())  # score lines end at eval_time:Nms


def test_new_format_legal_log():
    r = sl.parse_log(NEW_LEGAL)
    assert (r.status, r.seed, r.world_size, r.final_metric, r.final_bpb_text) == \
        ("ok", 201, 8, "final_int6_ttt_etlb_ngram", "1.07700000")
    assert r.legality_line == (True, "") and r.final_legal is True and r.final_reasons == ""
    assert r.legality() == ("yes", []) and r.problems == [] and r.notes == []
    # the decoys in the source-code region (a legal:0 legality line, another final_score) are ignored
    assert any(line.startswith("legality: legal:0") for line in r.source_lines)
    assert {k: (v.bpb_text, v.eval_ms, v.legal) for k, v in r.scores.items()} == {
        "pre_quant": ("1.08400000", 6802, None), "final_int6_roundtrip": ("1.09600000", 6301, None),
        "final_int6_sliding_window": ("1.08500000", 84458, None),
        "final_int6_ttt_etlb_ngram": ("1.07700000", 401200, None)}
    assert (r.total_bytes, r.model_bytes, r.code_bytes, r.train_text, r.eval_text, r.steps) == \
        (15_990_000, 15_962_000, 28_000, "596.5", "492.0", 4500)


def test_new_format_not_legal_log():
    r = sl.parse_log(NEW_PREQUANT)
    assert r.status == "ok" and r.problems == []
    assert r.final_metric == "final_int6_sliding_window_etlb_ngram" and r.final_legal is False
    # the last legality line (before evaluation) counts; reasons are split at "; " nowhere, kept whole
    assert r.legality_line[0] is False and r.legality_line[1].startswith("pre-quant TTT trained the artifact")
    assert r.final_reasons == r.legality_line[1] and r.final_reasons.endswith("MAX_WALLCLOCK_SECONDS=600")
    verdict, why = r.legality()
    assert verdict == "NO" and why[0].startswith("the log says legal:0 (pre-quant TTT trained")
    assert any("pre-quant TTT (trains" in w for w in why) and "training 612.3s > 600s" in why
    assert r.scores["pre_quant_ttt_scorefirst"].bpb_text == "1.04400000"


def test_new_format_console_capture_with_every_ablation():
    r = sl.parse_log(NEW_CONSOLE)
    assert r.status == "ok" and not r.source_lines and r.problems == [] and r.legality() == ("yes", [])
    assert set(r.scores) - {"pre_quant"} == {
        "final_int6_roundtrip", "final_int6_sliding_window",
        *(f"final_int6_{base}{etlb}{ngram}" for base in ("sliding_window", "ttt") for etlb in ("", "_etlb")
          for ngram in ("", "_ngram") if (base, etlb, ngram) != ("sliding_window", "", ""))}
    assert sorted(r.ablation_labels) == sorted(
        f"final_int6_{m}" for m in ("sliding_window_ngram", "sliding_window_etlb", "sliding_window_etlb_ngram",
                                    "ttt", "ttt_ngram", "ttt_etlb"))
    assert r.eval_without_ablations_s == pytest.approx(274.2 - (9.524 + 13.981 + 13.527 + 68.597 + 22.186 + 25.604))
    assert all(sl.KNOWN_LABELS.fullmatch(k) for k in r.scores if k != "pre_quant")


def test_new_format_disagreements_and_truncation_are_problems():
    text = NEW_LEGAL.read_text()
    # legality line and final_score disagree
    r = sl.parse_text(edit(text, r"^legality: legal:1$", "legality: legal:0 NOT leaderboard-legal: something"),
                      "x_seed201.txt")
    assert r.status == "INCONSISTENT" and r.legality()[0] == "NO"
    assert any("`legality:` line says legal:0 but final_score says legal:1" in p for p in r.problems)
    # cut right after the legality line: truncated, and its legal:0 reasons are reported
    body = NEW_PREQUANT.read_text().split("\nfinal_int6_roundtrip ")[0] + "\n"
    cut = sl.parse_text(body, "cut_seed202.txt")
    assert cut.status == "TRUNCATED" and cut.legality()[0] == "NO"
    assert any("legality line says legal:0 (pre-quant TTT trained" in w for w in cut.legality()[1])
    # an old-format score line that contradicts final_score
    old = (FIXTURES / "exactcap_seed102.txt").read_text()
    bad = sl.parse_text(edit(old, r"^(final_int6_ttt_etlb .*) legal:1$", r"\1 legal:0 NOT leaderboard-legal: x"),
                        "y_seed102.txt")
    assert any("final_int6_ttt_etlb line says legal:0" in p for p in bad.problems)


def test_unknown_score_label_is_noted():
    text = edit(NEW_LEGAL.read_text(), r"^(final_int6_sliding_window) val_loss",
                "final_int6_sliding_window\nfinal_int6_newpass val_loss:2.9 val_bpb:1.2 eval_time:5ms\n\\1 val_loss")
    r = sl.parse_text(text, "z_seed201.txt")
    assert "final_int6_newpass" in r.scores and r.problems == []
    assert any("final_int6_newpass" in n and "does not know" in n for n in r.notes)
    assert {k for k, _ in sl.SCORE_COLUMNS} - {"pre_quant"} == {
        "final_int6_roundtrip", "pre_quant_ttt_scorefirst",
        *(f"final_int6_{b}{e}{n}" for b in ("sliding_window", "ttt") for e in ("", "_etlb") for n in ("", "_ngram"))}
    assert all(sl.KNOWN_LABELS.fullmatch(k) for k, _ in sl.SCORE_COLUMNS if k != "pre_quant")


def test_both_formats_summarize_together(capsys, tmp_path):
    logs = [FIXTURES / "exactcap_seed102.txt", NEW_LEGAL, NEW_CONSOLE]
    rc, out, _ = summarize(capsys, [*logs, "--submission", tmp_path / "s.json", "--allow-problems"])
    budget = budget_rows(out)
    assert [budget[s]["legal"] for s in ("102", "201", "203")] == ["yes", "yes", "yes"]
    assert rc == 1 or "final metric differs" in out  # 102 scored TTT+ETLB, the others TTT+ETLB+ngram
    sub = json.loads((tmp_path / "s.json").read_text())
    assert sub["seed_results"]["201"]["artifact_bytes"] == 15_990_000
    assert sub["compliance"]["all_seeds_legal"] is True and sub["compliance"]["score_first_ttt"] is True
    # no --date: the latest date nvidia-smi printed in the logs' headers (only 201 and 202 have one)
    assert sub["date"] == "2026-11-24"
    summarize(capsys, [NEW_LEGAL, NEW_PREQUANT, "--submission", tmp_path / "s2.json"])
    assert json.loads((tmp_path / "s2.json").read_text())["date"] == "2026-11-25"


def test_submission_uses_the_records_field_names():
    """Per seed `artifact_bytes` etc., as records/track_10min_16mb/*/submission.json of openai/parameter-golf."""
    runs = [sl.parse_log(p) for p in (NEW_LEGAL, NEW_PREQUANT, NEW_CONSOLE)]
    sub = sl.build_submission(runs, author="a", github_id="g", name="n", blurb="b", date="2026-01-01", hardware=None)
    for key in ("author", "github_id", "name", "blurb", "date", "track", "val_bpb", "val_bpb_std", "val_loss",
                "val_loss_std", "seeds", "seed_results", "artifact_bytes_mean", "artifact_bytes_max", "bytes_total",
                "bytes_code", "pre_quant_val_bpb", "train_time_s_mean", "eval_time_s_mean", "step_avg_ms_mean",
                "train_steps_mean", "hardware", "pytorch_version", "technique_summary", "compliance"):
        assert key in sub, key
    assert sub["seeds"] == [201, 202, 203] and sub["hardware"] == "8xNVIDIA H100 80GB HBM3"
    r = sub["seed_results"]["202"]
    assert {"val_bpb", "val_loss", "pre_quant_val_bpb", "artifact_bytes", "bytes_model_compressed", "bytes_code",
            "steps", "step_avg_ms", "train_time_s", "eval_time_s"} <= set(r)
    assert "bytes_total" not in r and "bytes_model" not in r
    assert (r["artifact_bytes"], r["bytes_model_compressed"], r["bytes_code"]) == (15_990_100, 15_962_100, 28_000)
    assert (r["val_bpb"], r["pre_quant_val_bpb"], r["step_avg_ms"]) == (1.04, 1.084, round(586000 / 4500, 2))
    assert r["legal"] is False and r["not_legal_because"]
    assert sub["artifact_bytes_max"] == sub["bytes_total"] == 15_990_200
    c = sub["compliance"]
    assert (c["score_first_ttt"], c["no_etlb"], c["ngram_tilt"], c["no_pre_quant_ttt"]) == (False, False, True, False)
    assert (c["artifact_under_16mb"], c["train_under_600s"], c["eval_under_600s"]) == (True, False, True)
    assert c["times_measured_on_8_gpus"] is True and c["three_seeds"] is True and c["all_seeds_legal"] is False
    assert "pre-quant TTT (not leaderboard-legal)" in sub["technique_summary"]
    legal = sl.build_submission(runs[::2], author="", github_id="", name="", blurb="", date="", hardware="h",
                                technique="my recipe")
    c = legal["compliance"]
    assert (c["score_first_ttt"], c["no_etlb"], c["ngram_tilt"], c["no_pre_quant_ttt"]) == (True, False, True, True)
    assert legal["technique_summary"] == "my recipe" and c["all_seeds_legal"] is True


def test_reproduction_leaves_out_settings_the_script_lacks(tmp_path):
    script = tmp_path / "train_gpt.py"
    script.write_text("class Hyperparameters:\n    seed: int = 1\n    iterations: int = 20000\n"
                      "    ttt_lr: float = 0.005\n")
    logged_source = ("class Hyperparameters:\n    seed: int = 1\n    iterations: int = 20000\n"
                     "    ttt_lr: float = 0.005\n    ttt_optimizer: str = 'sgd'\n    val_batch_tokens: int = 524288\n")
    world = "\nworld_size: 8 grad_accum_steps: 1 device: cuda:0 attention: fa3\n"
    head, _, rest = NEW_LEGAL.read_text().partition(world)
    text = (head.replace("  iterations: 20000\n", "  iterations: 20000\n  ttt_optimizer: muon\n"
                         "  val_batch_tokens: 524288\n", 1).replace("  ttt_lr: 0.005", "  ttt_lr: 0.01")
            + world + logged_source
            + SEP + "\n" + rest.split(SEP + "\n", 1)[1])
    r = sl.parse_text(text, "a_seed201.txt")
    assert r.status == "ok" and "    ttt_optimizer: str = 'sgd'" in r.source_lines
    repro = sl.reproduction([r], script)
    first, rest_of = repro.split("\n", 1)
    # TTT_OPTIMIZER was changed in the run but the script has no such setting: said, not passed
    assert first == "# set in the logs but not settings of train_gpt.py (cannot be passed; the runs differ " \
                    "from it there): TTT_OPTIMIZER=muon"
    assert "TTT_LR=0.01" in rest_of and "TTT_OPTIMIZER" not in rest_of
    assert "VAL_BATCH_TOKENS" not in repro and "ITERATIONS" not in repro  # at their defaults: nothing to say
    # with the logged source as the script (--code-from-log), the setting is passed
    script.write_text(logged_source)
    assert "TTT_OPTIMIZER=muon" in sl.reproduction([r], script).split("\n", 1)[1]


# =============================================================================
# records folder
# =============================================================================

@slow
def test_records_dir(summary, tmp_path, capsys):
    _, _, logs = summary
    d = tmp_path / "records" / "2026-01-02_Tiny"
    rc, out, _ = summarize(capsys, [*logs, "--records-dir", d, "--code-from-log", "--name", "Tiny", "--author", "me"])
    assert rc == 0
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["README.md", "submission.json", "train_gpt.py", "requirements.txt",
                            *(f"train_seed{s}.log" for s in SEEDS)])
    for s, log in zip(SEEDS, logs):
        assert (d / f"train_seed{s}.log").read_bytes() == log.read_bytes()
    logged_source = "\n".join(sl.parse_log(logs[0]).source_lines)
    assert (d / "train_gpt.py").read_text().rstrip("\n") == logged_source.rstrip("\n")
    assert (d / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
    readme = (d / "README.md").read_text()
    assert readme.startswith("# Tiny") and "| seed | status |" in readme
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "ITERATIONS=4" in readme and "TTT_EPOCHS=1" in readme
    sub = json.loads((d / "submission.json").read_text())
    assert sub["name"] == "Tiny" and sub["author"] == "me" and sub["seeds"] == list(SEEDS)
    # an existing folder is not overwritten without --force
    with pytest.raises(SystemExit, match="not empty"):
        sl.main([*map(str, logs), "--records-dir", str(d), "--code-from-log"])
    capsys.readouterr()
    # copying a train_gpt.py that is not the code that produced the logs is a problem
    other = tmp_path / "train_gpt.py"
    other.write_text(logged_source + "\n# edited after the runs\n")
    rc, out, _ = summarize(capsys, [*logs, "--records-dir", tmp_path / "r2", "--script", other])
    assert rc == 1 and "is not the source recorded" in out


# =============================================================================
# the real bench logs (1xH100 / 4xH200) and the generated RESULTS.md
# =============================================================================

@pytest.mark.skipif(not (BENCH / "bench_seed1337_h100.txt").exists(), reason="no bench logs")
def test_bench_logs():
    r = sl.parse_log(BENCH / "bench_seed1337_h100.txt")
    assert (r.status, r.seed, r.world_size, r.final_metric, r.final_bpb_text) == \
        ("ok", 1337, 1, "final_int6_ttt_etlb", "1.58560822")
    assert (r.total_bytes, r.model_bytes, r.code_bytes, r.train_text, r.eval_text) == \
        (12629484, 12602355, 27129, "206.9", "107.7")
    assert set(r.scores) == {"pre_quant", "final_int6_roundtrip", "final_int6_sliding_window",
                             "final_int6_sliding_window_etlb", "final_int6_ttt", "final_int6_ttt_etlb"}
    assert r.legality() == ("yes", []) and r.gpus[0] == "NVIDIA H100 80GB HBM3" and r.run_date == "2026-11-26"
    assert r.eval_without_ablations_s == pytest.approx(107.7 - 14.885 - 49.864)
    four = sl.parse_log(BENCH / "bench_seed1337_4xh200.txt")
    assert (four.world_size, four.compressor, four.total_bytes, four.final_metric) == \
        (4, "lzma", 13466828, "final_int6_sliding_window")
    pq = sl.parse_log(BENCH / "bench_seed1337_prequant_ttt_h100.txt")
    assert pq.legality()[0] == "NO" and pq.pre_quant_ttt and pq.loaded_from
    assert pq.train_text is None and any("did not train" in p for p in pq.problems)


@pytest.mark.skipif(not (BENCH / "ngram_seed1337_ablations_h100.txt").exists(), reason="no bench logs")
def test_bench_log_with_every_ablation():
    # EVAL_ABLATIONS=1 with TTT, ETLB and the n-gram tilt (older format): six ablation passes, then the final
    r = sl.parse_log(BENCH / "ngram_seed1337_ablations_h100.txt")
    assert (r.status, r.final_metric, r.final_bpb_text, r.eval_text) == \
        ("ok", "final_int6_ttt_etlb_ngram", "1.54971171", "208.7")
    assert sorted(r.ablation_labels) == sorted(
        f"final_int6_{m}" for m in ("sliding_window_ngram", "sliding_window_etlb", "sliding_window_etlb_ngram",
                                    "ttt", "ttt_ngram", "ttt_etlb"))
    assert r.eval_without_ablations_s == pytest.approx(208.7 - (9.524 + 13.981 + 13.527 + 68.597 + 22.186 + 25.604))
    assert r.legality() == ("yes", [])


@pytest.mark.skipif(not (BENCH / "RESULTS.md").exists(), reason="logs/bench/RESULTS.md not generated")
def test_results_md_is_current(capsys, monkeypatch):
    """logs/bench/RESULTS.md is what its own first-line command prints today."""
    md = (BENCH / "RESULTS.md").read_text()
    cmd = re.search(r"^Command: `(.*)`$", md, re.M).group(1)
    import shlex
    argv = shlex.split(cmd)[2:]
    for opt in ("--out", "--submission", "--records-dir"):  # do not rewrite files
        while opt in argv:
            i = argv.index(opt)
            del argv[i:i + 2]
    monkeypatch.chdir(REPO)
    sl.main(argv)
    out = capsys.readouterr().out
    # from the tables to the notes (the command line differs; the reproduction section depends on the
    # defaults of the current train_gpt.py, which may have changed since)
    strip = lambda s: s.split("## Scores", 1)[1].split("## Reproduction")[0]  # noqa: E731
    assert strip(out) == strip(md)


# ============================================================================ scripts/*.sh

SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


def script_env(**env) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("BENCH_DATA_DIR", "GPUS", "CUDA_VISIBLE_DEVICES", "NPROC", "BENCH_RUNS", "BENCH_CODE")}
    full.update(env)
    return full


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("bench_data", [None, "/nowhere"])
def test_scripts_called_without_arguments_print_their_usage(script, bench_data, tmp_path):
    env = script_env(BENCH_RUNS=str(tmp_path / "runs"), **({"BENCH_DATA_DIR": bench_data} if bench_data else {}))
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert "usage:" in r.stderr and script.name in r.stderr
    assert "unbound variable" not in r.stderr and not (tmp_path / "runs").exists()


FAKE_TORCHRUN = """#!/bin/bash
# stands in for torchrun: prints what it was given
echo "torchrun $*"
env | grep -E '^(SEED|RUN_ID|DATA_DIR|ITERATIONS|TTT_LR|QK_GAIN_INIT|EMA_DECAY|RECUR_START_STEP)=' | sort
"""


def test_bench_sh(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "torchrun").write_text(FAKE_TORCHRUN)
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    (tmp_path / "train_gpt.py").write_text("# stand-in\n")
    (tmp_path / "bench_data").mkdir()
    env = script_env(BENCH_RUNS=str(tmp_path / "runs"), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    bench = lambda *a, **e: subprocess.run(["bash", str(REPO / "scripts" / "bench.sh"), *a],  # noqa: E731
                                           env={**env, **e}, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    r = bench("b1", "5", "TTT_LR=0.01")  # BENCH_DATA_DIR unset: said clearly, with the usage
    assert r.returncode == 2 and "BENCH_DATA_DIR is not set" in r.stderr and "usage:" in r.stderr
    data = str(tmp_path / "bench_data")
    for bad, why in ((("b1", "x"), "SEED 'x' is not a number"), (("b1", "5", "oops"), "'oops' is not VAR=VALUE"),
                     (("a/b", "5"), "NAME 'a/b'")):
        r = bench(*bad, BENCH_DATA_DIR=data)
        assert r.returncode == 2 and why in r.stderr and "usage:" in r.stderr, bad
    assert not (tmp_path / "runs").exists()
    r = bench("b1", "5", "TTT_LR=0.01", BENCH_DATA_DIR=data, NPROC="4")
    assert r.returncode == 0, r.stderr
    console = (tmp_path / "runs" / "b1" / "console.txt").read_text().splitlines()
    assert console[0] == f"torchrun --standalone --nproc_per_node=4 {tmp_path / 'train_gpt.py'}"
    assert set(console[1:-1]) == {"SEED=5", "RUN_ID=b1", f"DATA_DIR={data}/", "ITERATIONS=241", "TTT_LR=0.01",
                                  "EMA_DECAY=0.93"}
    assert console[-1] == "exit_code: 0"


# ============================================================================ scripts/ttt_sweep.sh

FAKE_BENCH = """#!/bin/bash
# stands in for scripts/bench.sh: records its GPU and arguments, writes the last lines of a run
name=$1; shift 2
mkdir -p "$BENCH_RUNS/$name"
echo "${CUDA_VISIBLE_DEVICES-unset}|$*" >> "$BENCH_RUNS/calls.txt"
printf '%s\\n' "legality: legal:1" "final_int6_ttt_etlb_ngram val_loss:1 val_bpb:1.5 eval_time:1ms" \\
  "final_score metric:final_int6_ttt_etlb_ngram val_bpb:1.5 legal:1" > "$BENCH_RUNS/$name/console.txt"
"""


def sweep(tmp_path: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "ttt_sweep.sh").write_text((REPO / "scripts" / "ttt_sweep.sh").read_text())
    (scripts / "args.bash").write_text((REPO / "scripts" / "args.bash").read_text())
    (scripts / "bench.sh").write_text(FAKE_BENCH)
    full = script_env(BENCH_RUNS=str(tmp_path / "runs"), **env)
    return subprocess.run(["bash", str(scripts / "ttt_sweep.sh"), *args], env=full, capture_output=True,
                          text=True, timeout=60)


def test_ttt_sweep_refuses_without_bench_data_or_artifact(tmp_path):
    art = tmp_path / "a.ptz"
    art.write_bytes(b"x")
    r = sweep(tmp_path, [str(art), "TTT_LR=0.01"])
    assert r.returncode != 0 and "BENCH_DATA_DIR" in r.stderr
    r = sweep(tmp_path, [str(tmp_path / "missing.ptz"), "TTT_LR=0.01"], BENCH_DATA_DIR="/nowhere")
    assert r.returncode == 2 and "missing.ptz" in r.stderr
    r = sweep(tmp_path, [str(art)], BENCH_DATA_DIR="/nowhere")  # no config
    assert r.returncode == 2 and "usage:" in r.stderr
    r = sweep(tmp_path, [str(art), "TTT_LR=0.01", "TTT_EPOCHS=2 bogus"], BENCH_DATA_DIR="/nowhere")
    assert r.returncode == 2 and "'bogus' in config 'TTT_EPOCHS=2 bogus' is not VAR=VALUE" in r.stderr
    assert not (tmp_path / "runs" / "calls.txt").exists()  # nothing ran


def test_ttt_sweep_runs_one_config_per_gpu_in_waves(tmp_path):
    art = tmp_path / "a.ptz"
    art.write_bytes(b"x")
    cfgs = ["TTT_LR=0.01", "TTT_EPOCHS=4 TTT_LR=0.003", "TTT_MOMENTUM=0.95"]
    r = sweep(tmp_path, [str(art), *cfgs], BENCH_DATA_DIR="/nowhere", GPUS="2 3")
    assert r.returncode == 0, r.stderr
    calls = sorted((tmp_path / "runs" / "calls.txt").read_text().splitlines(), key=lambda c: c.split("|")[1])
    assert len(calls) == 3
    by_cfg = {c.split("|")[1]: c.split("|")[0] for c in calls}
    assert by_cfg == {f"LOAD_ARTIFACT={art.resolve()} {c}": g for c, g in zip(cfgs, ["2", "3", "2"])}
    assert sorted(ln.split(" [")[0] for ln in r.stdout.splitlines()) == ["sweep1", "sweep2", "sweep3"]
    assert all(ln.endswith("rc=0: final_score metric:final_int6_ttt_etlb_ngram val_bpb:1.5 legal:1")
               for ln in r.stdout.splitlines())
    r = sweep(tmp_path, [str(art), "TTT_LR=0.02"], BENCH_DATA_DIR="/nowhere")  # no GPUS: GPU env untouched
    assert r.returncode == 0 and (tmp_path / "runs" / "calls.txt").read_text().splitlines()[-1].startswith("unset|")


def test_ttt_sweep_names_runs_after_sweep_name(tmp_path):
    art = tmp_path / "a.ptz"
    art.write_bytes(b"x")
    r = sweep(tmp_path, [str(art), "TTT_LR=0.01", "TTT_LR=0.02"], BENCH_DATA_DIR="/nowhere", SWEEP_NAME="m42_")
    assert r.returncode == 0, r.stderr
    assert [ln.split(" [")[0] for ln in r.stdout.splitlines()] == ["m42_1", "m42_2"]
    assert (tmp_path / "runs" / "m42_2" / "console.txt").exists() and not (tmp_path / "runs" / "sweep1").exists()


# ============================================================================ scripts/long_val_timing.sh


def test_long_val_timing_builds_a_prefix_val_shard_and_runs_the_eval(tmp_path):
    import numpy as np
    bench = tmp_path / "bench"
    ds = bench / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    (bench / "tokenizers").mkdir()
    (bench / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"tok")
    toks = (np.arange(5000) % 1024).astype("<u2")
    head = np.zeros(256, dtype="<i4")
    head[:3] = (20240520, 1, toks.size)
    (ds / "fineweb_train_000000.bin").write_bytes(head.tobytes() + toks.tobytes())
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "long_val_timing.sh").write_text((REPO / "scripts" / "long_val_timing.sh").read_text())
    (scripts / "args.bash").write_text((REPO / "scripts" / "args.bash").read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard_io.py").write_text((REPO / "data" / "shard_io.py").read_text())
    (scripts / "bench.sh").write_text(FAKE_BENCH)
    art = tmp_path / "a.ptz"
    art.write_bytes(b"x")
    env = script_env(BENCH_RUNS=str(tmp_path / "runs"), BENCH_DATA_DIR=str(bench), LONGVAL_DIR=str(tmp_path / "lv"),
                     LONGVAL_TOKENS="1001", NPROC="4")
    run = lambda *a: subprocess.run(["bash", str(scripts / "long_val_timing.sh"), *a], env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    r = run(str(art), "TTT_LR=0.004")
    assert r.returncode == 0, r.stderr
    val = (tmp_path / "lv" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").read_bytes()
    assert np.frombuffer(val[:12], dtype="<i4").tolist() == [20240520, 1, 1001] and len(val) == 1024 + 2 * 1001
    assert np.array_equal(np.frombuffer(val[1024:], dtype="<u2"), toks[:1001])
    assert (tmp_path / "lv" / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"tok"
    call = (tmp_path / "runs" / "calls.txt").read_text().splitlines()[-1]
    assert call == f"unset|LOAD_ARTIFACT={art.resolve()} DATA_DIR={tmp_path / 'lv'}/ TTT_LR=0.004"
    assert (tmp_path / "runs" / "longval_np4" / "console.txt").exists()
    assert "legality: legal:1" in r.stdout and "final_score metric:final_int6_ttt_etlb_ngram" in r.stdout
    env["LONGVAL_TOKENS"] = "6000"  # longer than the shard: a clear error, no run
    r = run(str(art))
    assert r.returncode != 0 and "at least 6000 tokens" in r.stderr
    vtoks = np.array([1, 7, 8, 9, 1, 5, 6], dtype="<u2")  # LONGVAL_SOURCE=val: the validation documents repeated
    (ds / "fineweb_val_000000.bin").write_bytes(head[:2].tobytes() + np.int32(7).tobytes() + head[3:].tobytes()
                                                + vtoks.tobytes())
    env.update(LONGVAL_SOURCE="val", LONGVAL_TOKENS="17")
    r = run(str(art))
    assert r.returncode == 0, r.stderr
    val = (tmp_path / "lv" / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").read_bytes()
    assert np.frombuffer(val[1024:], dtype="<u2").tolist() == (vtoks.tolist() * 3)[:17]
    env["LONGVAL_SOURCE"] = "books"
    r = run(str(art))
    assert r.returncode == 2 and "LONGVAL_SOURCE=books" in r.stderr


# ============================================================================ scripts/lora_ttt_timing.py


def test_lora_ttt_timing_plays_rank_0_of_a_larger_run(dataset, tmp_path):
    env = dict(tiny_env(*dataset), TIMING_WORLD="2", TIMING_TOKENS="6000", TTT_BATCH_SIZE="2", TTT_LORA_RANK="4",
               TTT_CHUNK_SIZE="32", PHASED_TTT_PREFIX_DOCS="2", PHASED_TTT_NUM_PHASES="2")
    script = REPO / "scripts" / "lora_ttt_timing.py"
    run = lambda *a, **e: subprocess.run([sys.executable, str(script), *a], env={**env, **e},  # noqa: E731
                                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    r = run()
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("timing:")]
    assert "tokens:6000" in lines[0] and "world:2" in lines[0] and "random init" in lines[0]
    costs = dict(kv.split(":") for kv in lines[1].split("rank: ")[1].split(" (")[0].split())
    h = dataclasses.replace(TINY, ttt_batch_size=2, ttt_chunk_size=32, phased_ttt_prefix_docs=2,
                            phased_ttt_num_phases=2)
    mod = script_module()
    val = mod.tg.load_validation_tokens(dataclasses.replace(h, data_dir=str(dataset[0]) + "/", vocab_size=dataset[1]))
    docs = mod.tg.find_documents(val.repeat(-(-6000 // val.numel()))[:6000])
    expect = mod.rank_costs(h, docs, 2)
    assert int(costs["rank0"]) == expect[0] and int(costs["max"]) == max(expect) and sum(expect) > 0
    # every window token of the pass is some rank's: the plan's costs add up to the whole pass's
    whole = sum(min((c + 1) * 32, h.eval_seq_len) for s, e in docs for c in range(-(-(e - s) // 32)))
    assert sum(expect) == whole
    assert "rank0 total:" in r.stdout and "lora_ttt_ngram: phase:suffix" in r.stdout and len(docs) > 4
    r = run(str(tmp_path / "missing.ptz"))
    assert r.returncode == 2 and "missing.ptz" in r.stderr and "Traceback" not in r.stderr
    r = run(TIMING_WORLD="3")
    assert r.returncode == 2 and "TIMING_WORLD=3" in r.stderr


def script_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("lora_ttt_timing", REPO / "scripts" / "lora_ttt_timing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
