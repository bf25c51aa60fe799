"""End-to-end main() runs (TINY, 1 process and 2-process gloo). Run: python3 -m pytest -q tests/test_smoke.py"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

from conftest import TINY, hparams_env

# ~60 s of subprocess runs on 2 cores: marked so that `-m "not slow"` can skip them (CI runs them).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_gpt.py")
# Line prefixes (the log also holds the hyperparameters and the source, so match whole line starts).
FINAL_LINES = ["pre-quantization post-ema val_loss:", "final_int6_roundtrip val_loss:",
               "final_int6_sliding_window val_loss:", "final_int6_ttt_etlb_ngram val_loss:", "Total submission size",
               "final_score metric:", "eval_time_total:", "stage:gptq seconds:"]


def tiny_env_for(dataset, workdir: Path, **over: str) -> dict[str, str]:
    """The conftest `tiny_env` (TINY as environment variables), for a module-scoped run directory."""
    data_dir, vocab = dataset
    h = dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab, run_id="test",
                            artifact_path=str(workdir / "model.ptz"), checkpoint_path=str(workdir / "model.pt"))
    env = hparams_env(h)
    env.update(over)
    return env


def base_env() -> dict[str, str]:
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    names |= {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it; avoids OpenMP spin-waits on a shared 2-core box
    return env


class Run:
    def __init__(self, cwd: Path, proc: subprocess.CompletedProcess):
        self.cwd, self.proc = cwd, proc
        log = cwd / "logs" / "test.txt"
        self.log = log.read_text(encoding="utf-8") if log.exists() else ""

    def has(self, prefix: str, text: str | None = None) -> bool:
        return any(ln.startswith(prefix) for ln in (self.log if text is None else text).splitlines())

    def line(self, prefix: str) -> str:
        hits = [ln for ln in self.log.splitlines() if ln.startswith(prefix)]
        assert hits, f"no line starting with {prefix!r} in the log:\n{self.log[-3000:]}"
        return hits[-1]

    def number(self, prefix: str, key: str) -> float:
        m = re.search(rf"{re.escape(key)}\s*(-?[0-9.]+(?:e-?\d+)?)", self.line(prefix))
        assert m, (prefix, key, self.line(prefix))
        return float(m.group(1))

    def check_ok(self) -> None:
        # on failure show where the run's log stopped and both ends of stderr: torchrun's failure
        # summary fills the end, the failing rank's own message comes before it
        assert self.proc.returncode == 0, "\n".join(["log tail:", self.log[-2000:], "stderr head:",
                                                      self.proc.stderr[:3000], "stderr tail:", self.proc.stderr[-1500:]])
        assert "Traceback" not in self.proc.stderr


def main_run(cwd: Path, env: dict[str, str], nproc: int = 1, timeout: int = 300) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
    proc = subprocess.run(cmd, cwd=cwd, env={**base_env(), **env}, capture_output=True, text=True, timeout=timeout)
    return Run(cwd, proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="module")
def base_run(dataset, workdir) -> Run:
    """One full TINY run (train, GPTQ, artifact, all default evals); it keeps its checkpoint for the variants."""
    run = main_run(workdir / "base", tiny_env_for(dataset, workdir / "base"))
    run.check_ok()
    return run


def test_tiny_main_run_prints_every_final_line(base_run):
    for key in FINAL_LINES:
        assert base_run.has(key, base_run.proc.stdout), key
        assert base_run.has(key), key
    assert (base_run.cwd / "logs" / "test.txt").is_file()
    # score lines end like the records' (eval_time:Nms); legality has its own line and final_score
    for label in ("final_int6_roundtrip", "final_int6_sliding_window ", "final_int6_ttt_etlb_ngram"):
        assert re.search(r" val_loss:[0-9.]+ val_bpb:[0-9.]+ eval_time:\d+ms$", base_run.line(label)), label
    assert base_run.line("legality:") == "legality: legal:1"
    assert re.search(r"final_score metric:final_int6_ttt_etlb_ngram val_bpb:[0-9.]+ legal:1$",
                     base_run.line("final_score"))
    # ablation-only and pre-quant-TTT lines are absent by default
    for label in ("final_int6_sliding_window_etlb", "final_int6_sliding_window_ngram", "final_int6_ttt val_loss",
                  "final_int6_ttt_etlb val_loss", "final_int6_ttt_ngram"):
        assert not base_run.has(label), label
    assert not base_run.has("pre_quant_ttt") and not base_run.has("ARTIFACT OVER LIMIT")
    assert not any("legal:0" in ln for ln in base_run.log.splitlines() if ln.startswith(("final", "legality")))
    assert not base_run.has("warning:")  # TINY quantizes every matrix and its EMA horizon fits the run
    assert base_run.number("6/6 train_loss", "train_loss:") < base_run.number("1/6 train_loss", "train_loss:")
    assert base_run.has("recurrence:activated step:3")
    assert base_run.has("GPTQ quantization: 24 layers with full GPTQ, 0 fallback")


def test_tiny_main_run_sizes_add_up(base_run):
    code = base_run.number("Code size:", "Code size:")
    model = base_run.number("Serialized model int6+brotli:", "brotli:")
    total = base_run.number("Total submission size", "brotli:")
    assert total == code + model
    assert model == (base_run.cwd / "model.ptz").stat().st_size
    assert code == tg.code_size()[1]
    assert (base_run.cwd / "model.pt").is_file()
    assert base_run.has("artifact: fits")


def test_scores_are_sane(base_run):
    pre = base_run.number("pre-quantization post-ema", "val_bpb:")
    rt = base_run.number("final_int6_roundtrip", "val_bpb:")
    sw = base_run.number("final_int6_sliding_window ", "val_bpb:")
    final = base_run.number("final_score", "val_bpb:")
    assert 0 < pre < 20 and abs(rt - pre) < 0.1 * pre  # int6 roundtrip stays close to the float model
    assert abs(sw - rt) < 0.1 * rt
    assert final == base_run.number("final_int6_ttt_etlb_ngram", "val_bpb:")


def test_eval_ablations_add_lines(dataset, workdir, base_run):
    # evaluation only (the base run's artifact); one TTT epoch and stride 64 keep it quick
    env = tiny_env_for(dataset, workdir / "abl", EVAL_ABLATIONS="1", LOAD_ARTIFACT=str(base_run.cwd / "model.ptz"),
                       TTT_EPOCHS="1", EVAL_STRIDE="64")
    run = main_run(workdir / "abl", env)
    run.check_ok()
    for mode in ("roundtrip", "sliding_window", "sliding_window_ngram", "sliding_window_etlb",
                 "sliding_window_etlb_ngram", "ttt", "ttt_ngram", "ttt_etlb", "ttt_etlb_ngram"):
        assert run.has(f"final_int6_{mode} val_loss:"), mode
    # the artifact evaluated is the base run's: the same roundtrip score
    assert run.number("final_int6_roundtrip", "val_bpb:") == base_run.number("final_int6_roundtrip", "val_bpb:")
    assert run.has("final_score metric:final_int6_ttt_etlb_ngram val_bpb:") and run.line("final_score").endswith("legal:1")


def test_pre_quant_ttt_is_labelled_not_legal(dataset, workdir, base_run):
    env = tiny_env_for(dataset, workdir / "pq", PRE_QUANT_TTT="1", LOAD_CHECKPOINT=str(base_run.cwd / "model.pt"),
                       TTT_ENABLED="0", ETLB_ENABLED="0", NGRAM_TILT="0")
    run = main_run(workdir / "pq", env)
    run.check_ok()
    assert run.has("pre_quant_ttt_scorefirst val_loss:")
    line = run.line("legality:")
    assert line.startswith("legality: legal:0 NOT leaderboard-legal: pre-quant TTT"), line
    assert run.line("final_int6_roundtrip val_loss:").endswith("ms")  # the score line carries no label
    # evaluation seconds = every scoring pass once (pre-quant TTT's included) + loading + GPTQ after it
    passes = sum(float(m) for m in re.findall(r"^\S+ val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms$", run.log, re.M)) / 1000
    stages = run.number("stage:deserialize", "seconds:") + run.number("stage:gptq", "seconds:")
    assert run.number("eval_time_total:", "eval_time_total:") == pytest.approx(passes + stages, abs=0.1 + 0.01 * passes)
    assert re.search(r"final_score .* legal:0", run.line("final_score"))
    assert "legal:1" not in run.line("final_score")
    # the checkpoint is the base run's EMA model: the same pre-quantization score
    pre = "pre-quantization post-ema"
    assert run.number(pre, "val_bpb:") == base_run.number(pre, "val_bpb:")


def test_size_fit_prune(dataset, workdir, base_run):
    natural = int(base_run.number("Total submission size", "brotli:"))
    limit = natural - 2000
    env = tiny_env_for(dataset, workdir / "prune", LOAD_CHECKPOINT=str(base_run.cwd / "model.pt"), SIZE_FIT="prune",
                       ARTIFACT_LIMIT_BYTES=str(limit), TTT_ENABLED="0", ETLB_ENABLED="0", NGRAM_TILT="0")
    run = main_run(workdir / "prune", env)
    run.check_ok()
    first = run.line("size_fit: over by")
    over = int(re.search(r"over by (\d+) bytes", first).group(1))
    assert 0 < over <= 2000  # the same checkpoint quantizes to the base run's size
    total = int(run.number("Total submission size", "brotli:"))
    assert total <= limit
    assert not run.has("ARTIFACT OVER LIMIT") and run.has("artifact: fits")
    assert run.line("final_score").endswith("legal:1")
    _, _, extra = tg.deserialize_artifact((workdir / "prune" / "model.ptz").read_bytes())
    assert extra["pruned_codes"] > 0  # the artifact records how many codes were zeroed
    # pruning costs a little quality, not a lot
    rt_base = base_run.number("final_int6_roundtrip", "val_bpb:")
    assert abs(run.number("final_int6_roundtrip", "val_bpb:") - rt_base) < 0.1 * rt_base


def test_size_fit_auto_requantizes_at_larger_sigmas(dataset, workdir, base_run):
    natural = int(base_run.number("Total submission size", "brotli:"))
    limit = natural - natural // 20  # 5% under: too much to prune cheaply, so SDClip re-quantizes
    env = tiny_env_for(dataset, workdir / "auto", LOAD_CHECKPOINT=str(base_run.cwd / "model.pt"),
                       ARTIFACT_LIMIT_BYTES=str(limit), TTT_ENABLED="0", ETLB_ENABLED="0", NGRAM_TILT="0")
    run = main_run(workdir / "auto", env)
    run.check_ok()
    assert run.has("size_fit: over by") and "re-quantizing with clip sigmas x" in run.line("size_fit: over by")
    assert int(run.number("Total submission size", "brotli:")) <= limit
    assert run.has("artifact: fits") and run.line("final_score").endswith("legal:1")
    _, meta, extra = tg.deserialize_artifact((workdir / "auto" / "model.ptz").read_bytes())
    coded = [i for i in meta.values() if "sigma_mult" in i]
    mult = {i["sigma_mult"] for i in coded}
    assert len(mult) == 1 and mult.pop() > 1.0  # one larger multiplier for every coded tensor
    h = tg.Hyperparameters()
    base = {"mlp": h.mlp_clip_sigmas, "attn": h.attn_clip_sigmas, "embed": h.embed_clip_sigmas}
    assert all(i["sigmas"] > base[i["group"]] for i in coded)
    assert extra["pruned_codes"] < 1000  # the re-quantization did the work, not pruning
    rt_base = base_run.number("final_int6_roundtrip", "val_bpb:")
    assert run.number("final_int6_roundtrip", "val_bpb:") < 1.1 * rt_base


def test_size_fit_fail(dataset, workdir, base_run):
    env = tiny_env_for(dataset, workdir / "fail", LOAD_CHECKPOINT=str(base_run.cwd / "model.pt"), SIZE_FIT="fail",
                       ARTIFACT_LIMIT_BYTES="1000", TTT_ENABLED="0", ETLB_ENABLED="0", NGRAM_TILT="0")
    run = main_run(workdir / "fail", env)
    assert "Traceback" not in run.proc.stderr
    assert run.proc.returncode == 1  # SIZE_FIT=fail stops the run with an error
    assert run.has("ARTIFACT OVER LIMIT")
    assert run.has("error: ArtifactError") and "SIZE_FIT=fail" in run.line("error: ArtifactError")
    assert not run.has("final_int6_roundtrip") and not run.has("final_score")  # no score is reported
    assert not run.has("size_fit: over by")  # nothing was pruned


def test_two_process_gloo_agrees_with_one_process(dataset, workdir, base_run):
    env = tiny_env_for(dataset, workdir / "ddp", TTT_ENABLED="0", ETLB_ENABLED="0", NGRAM_TILT="0")
    run = main_run(workdir / "ddp", env, nproc=2)
    run.check_ok()
    assert run.has("world_size: 2 grad_accum_steps: 4")
    # the same global batches: the scores agree up to float summation order (train_loss lines are
    # rank 0's share of the batch, so they are not compared)
    v1, v2 = run.number("6/6 val_loss", "val_bpb:"), base_run.number("6/6 val_loss", "val_bpb:")
    assert v1 == pytest.approx(v2, rel=1e-3)
    b1 = run.number("pre-quantization post-ema", "val_bpb:")
    b2 = base_run.number("pre-quantization post-ema", "val_bpb:")
    assert b1 == pytest.approx(b2, rel=1e-3)
    r1, r2 = run.number("final_int6_roundtrip", "val_bpb:"), base_run.number("final_int6_roundtrip", "val_bpb:")
    assert r1 == pytest.approx(r2, rel=1e-2)
    assert run.line("final_score").endswith("legal:1")


def test_two_process_ttt_shared_and_per_rank_chains(dataset, workdir, base_run):
    # Eval-only from the base run's artifact on 2 gloo ranks: the shared chain (gradients
    # all-reduced every step) and TTT_CHAINS=rank (no collectives until the score sum, ranks
    # with different step counts) both finish and report a legal score.
    art = str(base_run.cwd / "model.ptz")
    scores = {}
    for chains in ("shared", "rank"):
        env = tiny_env_for(dataset, workdir / f"ttt_{chains}", LOAD_ARTIFACT=art, TTT_CHAINS=chains,
                           TTT_BATCH_SEQS="4")
        run = main_run(workdir / f"ttt_{chains}", env, nproc=2)
        run.check_ok()
        assert re.search(r"final_score metric:final_int6_ttt_etlb_ngram val_bpb:[0-9.]+ legal:1$",
                         run.line("final_score"))
        scores[chains] = run.number("final_int6_ttt_etlb_ngram", "val_bpb:")
        slowest = run.number("ttt_etlb_ngram: loop_seconds", "slowest:")  # max over both ranks
        fastest = run.number("ttt_etlb_ngram: loop_seconds", "fastest:")
        assert slowest >= fastest >= 0
        per_rank = [float(x) for x in run.line("ttt_etlb_ngram: loop_seconds").split("per_rank:")[1].split(",")]
        assert len(per_rank) == 2 and (min(per_rank), max(per_rank)) == (fastest, slowest)
        assert per_rank[0] == run.number("ttt_etlb_ngram: loop_seconds", "rank0:")
    assert scores["shared"] != scores["rank"]  # different adaptation, both complete


def test_lora_ttt_eval_only_runs(dataset, workdir, base_run):
    # Eval-only from the base run's artifact with TTT_LORA_ENABLED=1 (whole-model TTT and ETLB off), on one
    # process and on 2 gloo ranks: its stage and score lines, per-phase lines, and it is the legal final score.
    art = str(base_run.cwd / "model.ptz")
    data_dir, vocab = dataset
    val = tg.load_validation_tokens(dataclasses.replace(TINY, data_dir=str(data_dir) + "/", vocab_size=vocab))
    n = len(tg.find_documents(val))  # the documents of this dataset's validation stream
    assert n > 6
    scores = {}
    for nproc in (1, 2):
        env = tiny_env_for(dataset, workdir / f"lora{nproc}", LOAD_ARTIFACT=art, TTT_ENABLED="0", ETLB_ENABLED="0",
                           TTT_LORA_ENABLED="1", TTT_LORA_RANK="8", TTT_BATCH_SIZE="4", TTT_LORA_LR="0.001",
                           TTT_CHUNK_SIZE="128", PHASED_TTT_PREFIX_DOCS="6", PHASED_TTT_NUM_PHASES="2")
        run = main_run(workdir / f"lora{nproc}", env, nproc=nproc)
        run.check_ok()
        assert re.search(rf"^lora_ttt_ngram: docs:{n} phases:1/2:3,2/2:3,suffix:{n - 6} rank:8 alpha:144 lr:0.001 "
                         r"chunk:128 batch_docs:4 global_lr:0.001$", run.log, re.M)
        for name, docs in (("1/2", 3), ("2/2", 6), ("suffix", n)):
            line = run.line(f"lora_ttt_ngram: phase:{name} ")
            assert re.search(rf"docs:{docs}/{n} running_bpb:[0-9.]+ elapsed:[0-9.]+s global_sgd:[0-9.]+s$", line)
        assert run.number("lora_ttt_ngram: phase:1/2", "global_sgd:") > 0
        assert run.number("lora_ttt_ngram: phase:suffix", "global_sgd:") == 0
        assert run.has("stage:lora_ttt_ngram seconds:") and run.has("final_int6_sliding_window_ngram val_loss:")
        assert re.search(r" val_loss:[0-9.]+ val_bpb:[0-9.]+ eval_time:\d+ms$", run.line("final_int6_lora_ttt_ngram"))
        assert re.search(r"final_score metric:final_int6_lora_ttt_ngram val_bpb:[0-9.]+ legal:1$",
                         run.line("final_score"))
        assert run.line("legality:") == "legality: legal:1"
        # evaluation seconds = every scoring pass once (LoRA TTT's included) + loading the artifact
        passes = re.findall(r"^\S+ val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms$", run.log, re.M)
        total = sum(float(m) for m in passes) / 1000 + run.number("stage:deserialize", "seconds:")
        assert run.number("eval_time_total:", "eval_time_total:") == pytest.approx(total, abs=0.1 + 0.01 * total)
        lora_s = run.number("final_int6_lora_ttt_ngram", "eval_time:") / 1000
        assert run.number("stage:lora_ttt_ngram", "seconds:") >= lora_s - 0.01
        scores[nproc] = run.number("final_int6_lora_ttt_ngram", "val_bpb:")
        sliding = run.number("final_int6_sliding_window_ngram", "val_bpb:")
        assert abs(scores[nproc] - sliding) < 0.2 * sliding
    assert scores[1] != scores[2]  # the ranks' documents get their own adapter chains and tilt chains
