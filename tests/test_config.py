"""CONFIG/RUNTIME: env parsing, defaults, errors, typo warnings. Run: python3 -m pytest -q tests/test_config.py"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]


def test_from_env_parses_each_type():
    h = tg.Hyperparameters.from_env({
        "NUM_LAYERS": "7", "MATRIX_LR": "0.125", "BETA2": "1e-6", "TTT_ENABLED": "0", "ETLB_ENABLED": "false",
        "PRE_QUANT_TTT": "1", "EVAL_ABLATIONS": "true", "GPTQ_CLIP": "percentile", "RUN_ID": " abc ",
        "LOOP_START": "2", "LOOP_END": "3", "NUM_LOOPS": "1", "XSA_LAST_N": "7", "PARALLEL_START_LAYER": "5", "VE_LAYERS": "5,6", "PRE_QUANT_TTT_FREEZE": "5",
    })
    assert h.num_layers == 7 and type(h.num_layers) is int
    assert h.matrix_lr == 0.125 and type(h.matrix_lr) is float
    assert h.beta2 == 1e-6
    assert h.ttt_enabled is False and h.etlb_enabled is False
    assert h.pre_quant_ttt is True and h.eval_ablations is True
    assert h.gptq_clip == "percentile" and h.run_id == "abc"
    assert h.loop_order == [0, 1, 2, 3, 2, 3, 4, 5, 6] and h.ve_layer_list == [5, 6]
    assert h.parallel_start_layer == 5
    # a float field accepts an integer spelling; untouched fields keep their defaults
    assert tg.Hyperparameters.from_env({"MAX_WALLCLOCK_SECONDS": "300"}).max_wallclock_seconds == 300.0
    assert h.model_dim == tg.Hyperparameters().model_dim


@pytest.mark.parametrize("raw,val", [("1", True), ("0", False), ("true", True), ("False", False),
                                     ("yes", True), ("off", False)])
def test_bool_spellings(raw, val):
    assert tg.Hyperparameters.from_env({"COMPILE": raw}).compile is val


def test_from_env_ignores_unrelated_and_empty_env_gives_defaults():
    assert tg.Hyperparameters.from_env({}) == tg.Hyperparameters()
    assert tg.Hyperparameters.from_env({"PATH": "/x", "HOME": "/y"}) == tg.Hyperparameters()


def test_defaults_are_the_frontier_stack():
    h = tg.Hyperparameters()
    assert h.muon_wd == pytest.approx(0.095) and h.embed_wd == pytest.approx(0.085)
    assert h.qk_gain_init == 5.0 and h.muon_momentum == 0.97 and h.beta2 == 0.99 and h.min_lr == 0.10
    assert h.loop_order == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10] and h.enable_looping_at == 0.35
    assert h.parallel_start_layer == 8 and h.smear_gate_enabled and h.sparse_attn_gate_enabled
    assert h.ve_layer_list == []
    assert h.ttt_enabled is True and h.etlb_enabled is True
    assert h.pre_quant_ttt is False
    assert (h.ttt_chains, h.ttt_batch_seqs) == ("rank", 2)
    assert h.ngram_tilt is True
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.vocab_size) == (11, 512, 8, 4, 8192)
    assert h.artifact_limit_bytes == 16_000_000
    h.validate()  # the defaults themselves are consistent


@pytest.mark.parametrize("env,name", [
    ({"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
    ({"NUM_LAYERS": "2.5"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR"),
    ({"TTT_ENABLED": "maybe"}, "TTT_ENABLED"),
    ({"NUM_HEADS": "7"}, "NUM_HEADS"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "1000"}, "TRAIN_BATCH_TOKENS"),
    ({"LOOP_END": "11"}, "LOOP_END"),
    ({"LOOP_START": "-1"}, "LOOP_START"),
    ({"LOOP_START": "6", "LOOP_END": "5"}, "LOOP_END"),
    ({"NUM_LOOPS": "-1"}, "NUM_LOOPS"),
    ({"ENABLE_LOOPING_AT": "1.5"}, "ENABLE_LOOPING_AT"),
    ({"MIN_LR": "-0.1"}, "MIN_LR"),
    ({"PARALLEL_START_LAYER": "11"}, "PARALLEL_START_LAYER"),
    ({"GATE_WINDOW": "0"}, "GATE_WINDOW"),
    ({"VE_LAYERS": "a,b"}, "VE_LAYERS"),
    ({"VE_LAYERS": "12"}, "VE_LAYERS"),
    ({"EMA_DECAY": "1.0"}, "EMA_DECAY"),
    ({"EMA_DECAY": "-0.1"}, "EMA_DECAY"),
    ({"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC"),
    ({"ITERATIONS": "0"}, "ITERATIONS"),
    ({"WARMUP_STEPS": "-1"}, "WARMUP_STEPS"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE"),
    ({"TTT_CHUNK": "1000"}, "TTT_CHUNK"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS"),
    ({"ROPE_DIMS": "66"}, "ROPE_DIMS"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N"),
    ({"SIZE_FIT": "squeeze"}, "SIZE_FIT"),
    ({"TTT_CHAINS": "both"}, "TTT_CHAINS"),
    ({"GPTQ_CLIP": "minmax"}, "GPTQ_CLIP"),
    ({"BETA2": "1.0"}, "BETA2"),
    ({"QUANT_MIN_NUMEL": "-1"}, "QUANT_MIN_NUMEL"),
    ({"VE_DIM": "0", "VE_LAYERS": "9,10"}, "VE_DIM"),
    ({"PRE_QUANT_TTT": "1", "PRE_QUANT_TTT_FREEZE": "11"}, "PRE_QUANT_TTT_FREEZE"),
    ({"LOAD_CHECKPOINT": "a.pt", "LOAD_ARTIFACT": "b.ptz"}, "LOAD_ARTIFACT"),
])
def test_malformed_values_raise_config_error_naming_the_variable(env, name):
    with pytest.raises(tg.ConfigError) as ei:
        tg.Hyperparameters.from_env(env)
    assert name in str(ei.value)
    assert isinstance(ei.value, ValueError)  # ConfigError is a ValueError subclass (callers may rely on it)


def test_config_error_message_shows_the_value():
    with pytest.raises(tg.ConfigError, match=r"NUM_LAYERS='abc'"):
        tg.Hyperparameters.from_env({"NUM_LAYERS": "abc"})
    with pytest.raises(tg.ConfigError, match=r"MODEL_DIM=512"):
        tg.Hyperparameters.from_env({"NUM_HEADS": "7"})


def test_derived_properties_follow_replace():
    h = dataclasses.replace(tg.Hyperparameters(), model_dim=256, num_heads=4, vocab_size=1024, data_dir="/d/")
    assert h.head_dim == 64
    assert h.train_files == "/d/datasets/fineweb10B_sp1024/fineweb_train_*.bin"
    assert h.val_files == "/d/datasets/fineweb10B_sp1024/fineweb_val_*.bin"
    assert h.tokenizer_path == "/d/tokenizers/fineweb_1024_bpe.model"
    assert dataclasses.replace(h, ve_layers="").ve_layer_list == []


def test_setup_runtime_rejects_world_size_not_dividing_8():
    # Only invalid values: a valid RANK+WORLD_SIZE would initialise a process group.
    for ws in ("3", "5", "16", "0"):
        with pytest.raises(tg.ConfigError, match="WORLD_SIZE"):
            tg.setup_runtime({"WORLD_SIZE": ws, "RANK": "0"})
    with pytest.raises(tg.ConfigError, match="WORLD_SIZE"):
        tg.setup_runtime({"WORLD_SIZE": "two", "RANK": "0"})


def test_setup_runtime_single_process_without_torchrun_vars():
    rt = tg.setup_runtime({})
    assert (rt.rank, rt.world_size, rt.distributed, rt.grad_accum_steps) == (0, 1, False, 8)
    assert rt.is_main
    assert tg.Runtime(rank=1, world_size=4).grad_accum_steps == 2
    assert not tg.Runtime(rank=1, world_size=4).is_main


def test_world_size_without_rank_is_consistent():
    try:
        rt = tg.setup_runtime({"WORLD_SIZE": "2"})
    except tg.ConfigError as e:  # acceptable: refuse, naming the variables
        assert "RANK" in str(e) and "WORLD_SIZE" in str(e)
        return
    assert rt.distributed or rt.world_size == 1, rt  # or: run as the single process it is


def test_env_typo_warnings():
    w = tg.env_typo_warnings({"NUM_LAYER": "3", "PATH": "/x", "NUM_LAYERS": "4", "RANK": "0",
                              "LOCAL_WORLD_SIZE": "1", "MATRIX_LRR": "0.1"})
    text = "\n".join(w)
    assert len(w) == 2, w
    assert "NUM_LAYER " in text and "NUM_LAYERS" in text
    assert "MATRIX_LRR" in text and "MATRIX_LR?" in text
    assert "PATH" not in text and "RANK" not in text and "LOCAL_WORLD_SIZE" not in text
    assert tg.env_typo_warnings({"PATH": "/x", "HOME": "/h", "num_layer": "1"}) == []


def test_removed_settings_are_named_not_silently_ignored():
    w = tg.env_typo_warnings({"TTT_OPTIMIZER": "muon", "COMPRESSOR": "lzma"})
    assert len(w) == 2 and all("no longer a setting" in x for x in w), w
    assert "TTT_OPTIMIZER" in w[0] + w[1] and "COMPRESSOR" in w[0] + w[1]
    known = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    assert not known & set(tg.REMOVED_SETTINGS)


def test_one_recipe_settings_budget():
    assert len(dataclasses.fields(tg.Hyperparameters)) <= 96


def _clean_env(**extra: str) -> dict[str, str]:
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)} | {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, capture_output=True, text=True,
                       env=_clean_env(NUM_LAYERS="abc"), timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "NUM_LAYERS" in r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert not (tmp_path / "logs").exists()  # stopped before any work


def test_every_field_is_in_readme_env_table():
    text = (REPO / "README.md").read_text(encoding="utf-8") if (REPO / "README.md").exists() else ""
    assert any(line.strip() == "## Environment variables" for line in text.splitlines())
    section = text.split("## Environment variables", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    documented = set(re.findall(r"^\|\s*`?([A-Z][A-Z0-9_]*)`?\s*\|", section, flags=re.M))
    missing = [f.name.upper() for f in dataclasses.fields(tg.Hyperparameters) if f.name.upper() not in documented]
    assert not missing, f"README env table lacks {missing}"
    extra = sorted(documented - {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)})
    assert not extra, f"README env table lists {extra}, which are not settings"


def test_readme_env_table_defaults_match_the_code():
    """The README's default column is the dataclass default (a stale row misleads every user)."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("## Environment variables", 1)[1]
    section = re.split(r"\n## ", section, maxsplit=1)[0]
    rows = {m.group(1): m.group(2).strip().strip("`") for m in
            re.finditer(r"^\|\s*`?([A-Z][A-Z0-9_]*)`?\s*\|([^|]*)\|", section, flags=re.M)}
    stale = []
    for f in dataclasses.fields(tg.Hyperparameters):
        shown, d = rows[f.name.upper()], f.default
        if f.name == "run_id":  # documented as what the empty default turns into
            continue
        if isinstance(d, bool):
            ok = shown == str(int(d))
        elif isinstance(d, (int, float)):
            try:
                ok = float(shown) == float(d)
            except ValueError:
                ok = False
        else:
            ok = shown == d or (d == "" and shown in ("empty", "(empty)"))
        if not ok:
            stale.append(f"{f.name.upper()}: README {shown!r}, code {d!r}")
    assert not stale, stale
