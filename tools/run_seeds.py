#!/usr/bin/env python3
"""Run train_gpt.py once per seed, one after another, with the same settings.

    python3 tools/run_seeds.py [--seeds 1337,42,2025] [--nproc 8 | --python] [--prefix NAME]
                               [--dry-run] [--overwrite] [--summarize] [VAR=VALUE ...]

Each run gets SEED=<seed> and RUN_ID=<prefix>_seed<seed>, so it writes logs/<prefix>_seed<seed>.txt
(in the working directory, like train_gpt.py itself). VAR=VALUE arguments are added to the
environment of every run; a VAR that is not a setting of the script (removed or misspelt) is refused
unless --no-check. A run that exits non-zero, or whose log has no final_score line,
stops the series with a message naming the seed and the log; the remaining seeds do not run.
Then: python3 tools/summarize_logs.py logs/<prefix>_seed*.txt. Not part of train_gpt.py.
"""
from __future__ import annotations

import argparse
import ast
import collections
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import summarize_logs  # noqa: E402

DEFAULT_SEEDS = (1337, 42, 2025)
SET_BY_RUNNER = ("SEED", "RUN_ID")
# Environment variables that are not train_gpt.py settings but are fine to pass.
PASS_THROUGH = re.compile(r"(NCCL_|TORCH|CUDA_|OMP_|MKL_|PYTHON|TORCHINDUCTOR_|TRITON_|HF_|LD_|PATH$)")


class RunnerError(Exception):
    pass


def parse_seeds(raw: str) -> list[int]:
    try:
        seeds = [int(x) for x in re.split(r"[,\s]+", raw.strip()) if x]
    except ValueError:
        raise RunnerError(f"--seeds {raw!r}: expected integers separated by commas, e.g. 1337,42,2025") from None
    if not seeds:
        raise RunnerError("--seeds: no seed given")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise RunnerError(f"--seeds: seed(s) {dup} given twice (each seed writes one log)")
    return seeds


def setting_names(script: Path) -> list[str] | None:
    """Upper-case Hyperparameters field names of a train_gpt.py source (None if not readable)."""
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Hyperparameters":
            return [st.target.id.upper() for st in node.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)]
    return None


def parse_assignments(items: list[str], script: Path, check: bool) -> tuple[dict[str, str], list[str]]:
    """VAR=VALUE arguments -> (env additions, warnings); names that are not settings are errors."""
    env, warnings = {}, []
    known = setting_names(script) if check else None
    if check and known is None and items:
        warnings.append(f"warning: cannot read the settings of {script}; VAR=VALUE arguments passed unchecked")
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RunnerError(f"argument {item!r} is not VAR=VALUE (settings are environment variables, "
                              f"e.g. NUM_LAYERS=11)")
        if name in SET_BY_RUNNER:
            raise RunnerError(f"{name} is set per run by the runner (use --seeds / --prefix), not as {item!r}")
        if known is not None and name not in known and not PASS_THROUGH.match(name):
            # a removed or misspelt setting would be ignored by the runs: refuse it
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}? " if close else "it was removed or is misspelt; "
            raise RunnerError(f"{name} is not a setting of {script.name}: {hint}"
                              f"(--no-check passes it anyway)")
        env[name] = value
    return env, warnings


def _display_path(path: Path, base: Path) -> str:
    """path relative to base when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def launcher(args, script_arg: str) -> tuple[list[str], list[str]]:
    """(command to run, command to show)."""
    if args.python:
        return [sys.executable, script_arg], ["python3", script_arg]
    flags = ["--standalone", f"--nproc_per_node={args.nproc}", script_arg]
    exe = shutil.which("torchrun")
    real = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    return real + flags, ["torchrun"] + flags


def run_one(cmd: list[str], env: dict, cwd: Path, tail: collections.deque) -> int:
    """Run, streaming its output to ours; keep the last lines in `tail`."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, errors="replace")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def failure_message(seed: int, index: int, seeds: list[int], shown: str, rc: int, log_path: Path,
                    tail: collections.deque, done: list[int]) -> str:
    lines = [f"run_seeds: FAILED at seed {seed} (run {index + 1} of {len(seeds)}): `{shown}`"
             + (f" exited with code {rc}" if rc else " exited with code 0")]
    if not log_path.is_file():
        lines.append(f"  log {log_path}: not written (the run stopped before logging; see its output below)")
    else:
        r = summarize_logs.parse_log(log_path)
        if r.error:
            lines.append(f"  log {log_path} says: {r.error}")
        elif r.final_metric is None:
            lines.append(f"  log {log_path} has no final_score line: " + "; ".join(r.problems))
        else:
            lines.append(f"  log {log_path}: final_score present; the run still exited with code {rc}")
    if tail:
        lines.append("  last output:")
        lines += [f"    {t}" for t in tail]
    rest = seeds[index + 1:]
    lines.append(f"  completed: {', '.join(map(str, done)) or 'none'}; not run: {', '.join(map(str, rest)) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("settings", nargs="*", metavar="VAR=VALUE", help="environment for every run")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated (default %(default)s)")
    ap.add_argument("--nproc", type=int, default=None, help="torchrun --nproc_per_node (default 8)")
    ap.add_argument("--python", action="store_true", help="run `python3 train_gpt.py` (1 process: 1 GPU or CPU)")
    ap.add_argument("--prefix", default=None, help="RUN_ID=<prefix>_seed<S> (default: a timestamp)")
    ap.add_argument("--script", default=None, help="train_gpt.py to run (default: the project's)")
    ap.add_argument("--workdir", default=".", help="where the runs start; logs go to WORKDIR/logs/ (default .)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete an existing logs/<RUN_ID>.txt first (train_gpt.py appends to it otherwise)")
    ap.add_argument("--no-check", action="store_true",
                    help="pass VAR names that are not settings of the script (removed or misspelt) anyway")
    ap.add_argument("--summarize", action="store_true", help="run tools/summarize_logs.py on the logs at the end")
    a = ap.parse_args(argv)
    try:
        if a.python and a.nproc not in (None, 1):
            raise RunnerError("--python runs one process; drop --nproc (or use torchrun without --python)")
        nproc = 1 if a.python else (a.nproc if a.nproc is not None else 8)
        if nproc <= 0 or 8 % nproc:
            raise RunnerError(f"--nproc {nproc}: train_gpt.py needs a world size that divides 8 (1, 2, 4 or 8)")
        a.nproc = nproc
        seeds = parse_seeds(a.seeds)
        workdir = Path(a.workdir).resolve()
        script = Path(a.script).resolve() if a.script else REPO / "train_gpt.py"
        if not script.is_file():
            raise RunnerError(f"{script} does not exist")
        script_arg = _display_path(script, workdir)
        prefix = a.prefix or time.strftime("%Y%m%d_%H%M%S")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", prefix):
            raise RunnerError(f"--prefix {prefix!r}: use letters, digits, '.', '_' or '-' (it names the log files)")
        extra, warnings = parse_assignments(a.settings, script, not a.no_check)
        for w in warnings:
            print(w, file=sys.stderr)
        real_cmd, shown_cmd = launcher(a, script_arg)
        plan = []
        for seed in seeds:
            run_id = f"{prefix}_seed{seed}"
            log_path = workdir / "logs" / f"{run_id}.txt"
            per_run = {"SEED": str(seed), "RUN_ID": run_id, **extra}
            shown = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in per_run.items()), *map(shlex.quote, shown_cmd)])
            plan.append((seed, run_id, log_path, per_run, shown))
        existing = [str(p) for _, _, p, _, _ in plan if p.exists()]
        if existing and not a.overwrite and not a.dry_run:
            raise RunnerError("log(s) already exist and train_gpt.py would append to them: " + ", ".join(existing)
                              + " (use another --prefix, or --overwrite to delete them first)")
    except RunnerError as e:
        print(f"run_seeds: error: {e}", file=sys.stderr)
        return 2

    cd = "" if workdir == Path.cwd().resolve() else f"cd {shlex.quote(str(workdir))} && "
    if a.dry_run:
        print(f"# {len(plan)} run(s), one after another; each writes logs/<RUN_ID>.txt under {workdir}")
        for seed, run_id, log_path, per_run, shown in plan:
            note = "  # exists: would be deleted first (--overwrite)" if log_path.exists() and a.overwrite else (
                "  # exists: the real run refuses (train_gpt.py would append)" if log_path.exists() else "")
            print(f"{cd}{shown}{note}")
        print("# then: python3 tools/summarize_logs.py "
              + " ".join(shlex.quote(_display_path(p[2], Path.cwd())) for p in plan))
        return 0

    base_env = dict(os.environ)
    base_env.setdefault("PYTHONUNBUFFERED", "1")
    done: list[int] = []
    t_all = time.time()
    for i, (seed, run_id, log_path, per_run, shown) in enumerate(plan):
        if a.overwrite and log_path.exists():
            log_path.unlink()
        print(f"run_seeds: seed {seed} ({i + 1}/{len(plan)}): {cd}{shown}", flush=True)
        tail: collections.deque = collections.deque(maxlen=15)
        t0 = time.time()
        try:
            rc = run_one(real_cmd, {**base_env, **per_run}, workdir, tail)
        except KeyboardInterrupt:
            print(f"\nrun_seeds: interrupted at seed {seed} (log {log_path}); completed: "
                  f"{', '.join(map(str, done)) or 'none'}", file=sys.stderr)
            return 130
        except OSError as e:
            print(f"run_seeds: FAILED at seed {seed}: cannot start `{shown}`: {e}", file=sys.stderr)
            return 1
        r = summarize_logs.parse_log(log_path) if log_path.is_file() else None
        if rc != 0 or r is None or r.final_metric is None:
            print(failure_message(seed, i, seeds, shown, rc, log_path, tail, done), file=sys.stderr)
            return 1
        done.append(seed)
        legal = r.legality()[0]
        print(f"run_seeds: seed {seed} done in {time.time() - t0:.0f}s: {r.final_metric} val_bpb:{r.final_bpb_text} "
              f"legal:{legal} log:{log_path}", flush=True)
    logs = [_display_path(p, Path.cwd()) for _, _, p, _, _ in plan]
    print(f"run_seeds: all {len(plan)} run(s) finished in {time.time() - t_all:.0f}s. Summarize with:\n"
          f"  python3 tools/summarize_logs.py {' '.join(map(shlex.quote, logs))}", flush=True)
    if a.summarize:
        return summarize_logs.main(logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
