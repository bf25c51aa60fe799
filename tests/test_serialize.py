"""SERIALIZE: artifact format and errors, packed code size. Run: python3 -m pytest -q tests/test_serialize.py"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import train_gpt as tg

from conftest import TINY, perturbed_tiny_model

REPO = Path(__file__).resolve().parents[1]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.q": torch.randint(-31, 32, (17, 33), generator=g, dtype=torch.int64).to(torch.int8),
        "w.scale": torch.rand(17, generator=g).half(),
        "emb": torch.randn(9, 5, generator=g).bfloat16(),
        "ctrl": torch.randn(7, generator=g),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "u8": torch.arange(5, dtype=torch.uint8),
        "i64": torch.tensor([-(2**40), 2**40 + 1]),
        "odd.bf16": torch.tensor([float("inf"), -0.0, float("nan"), 1e-38]).bfloat16(),
    }


META = {"w": {"type": "int6", "method": "gptq", "clip_range": 31}, "emb": {"type": "passthrough"}}
EXTRA = {"shape": {"num_layers": 4, "mlp_mult": 4.0, "loop_end": 2}, "recurrence_active": True, "note": "é"}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # bitwise equality (NaN and -0.0 included)
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].contiguous().reshape(-1).view(torch.uint8)), k


def test_round_trip_is_exact():
    t = sample_tensors()
    blob = tg.serialize_artifact(t, META, EXTRA)
    assert blob[:6] == tg.ARTIFACT_MAGIC and blob[6] == tg.BROTLI_CODEC_ID
    t2, meta2, extra2 = tg.deserialize_artifact(blob)
    assert_same_tensors(t, t2)
    assert meta2 == META and extra2 == EXTRA


def test_round_trip_non_contiguous_input():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t2, _, _ = tg.deserialize_artifact(tg.serialize_artifact({"t": base.T}, {}, {}))
    assert torch.equal(t2["t"], base.T)


def test_serialization_is_deterministic():
    a = tg.serialize_artifact(sample_tensors(), META, EXTRA)
    # same content, dicts built in another insertion order
    t = dict(reversed(list(sample_tensors().items())))
    b = tg.serialize_artifact(t, dict(reversed(list(META.items()))), dict(reversed(list(EXTRA.items()))))
    assert a == b


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000, 1001])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_byte_shuffle_inverse(n, stride):
    data = bytes(os.urandom(n))
    sh = tg.byte_shuffle(data, stride)
    assert len(sh) == n + 5 and sh[:4] == tg.SHUFFLE_MAGIC
    assert tg.byte_unshuffle(sh) == data


def test_byte_shuffle_groups_bytes():
    assert tg.byte_shuffle(b"abcdefg", 2)[5:] == b"acegbdf"


def test_byte_unshuffle_rejects_garbage():
    for bad in (b"", b"BSH", b"XXXX\x02abc", b"BSHF\x00abc"):
        with pytest.raises(tg.ArtifactError):
            tg.byte_unshuffle(bad)


def expect_artifact_error(blob: bytes, *fragments: str) -> str:
    try:
        tg.deserialize_artifact(blob, "my.ptz")
    except tg.ArtifactError as e:
        msg = str(e)
        assert "my.ptz" in msg
        for f in fragments:
            assert f in msg, (f, msg)
        return msg
    except Exception as e:  # any other type is a failure of the contract
        pytest.fail(f"{type(e).__name__} instead of ArtifactError: {e}")
    pytest.fail("corrupt artifact was accepted")


def test_truncated_artifact():
    blob = tg.serialize_artifact(sample_tensors(), META, EXTRA)
    for k in (0, 3, 6, 7, 8, 20, len(blob) // 2, len(blob) - 5, len(blob) - 1):
        expect_artifact_error(blob[:k])


def test_flipped_magic_and_codec():
    blob = bytearray(tg.serialize_artifact(sample_tensors(), META, EXTRA))
    for i in range(6):
        b = bytearray(blob)
        b[i] ^= 0x20
        expect_artifact_error(bytes(b), "bad magic")
    b = bytearray(blob)
    b[6] = 9
    expect_artifact_error(bytes(b), "codec")
    b[6] = 1  # a codec id of an earlier version (lzma), no longer written or read
    expect_artifact_error(bytes(b), "codec")


def test_foreign_files(tmp_path):
    expect_artifact_error(os.urandom(5000), "bad magic")
    expect_artifact_error(tg.ARTIFACT_MAGIC + b"\x00" + os.urandom(5000))
    expect_artifact_error(tg.ARTIFACT_MAGIC + b"\x01" + os.urandom(5000))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    expect_artifact_error(buf.getvalue(), "bad magic")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    expect_artifact_error(buf.getvalue(), "bad magic")
    expect_artifact_error(pickle.dumps({"w": 1}), "bad magic")
    # a payload that decompresses but is not a shuffled container, or a shuffled non-container
    expect_artifact_error(tg.ARTIFACT_MAGIC + bytes([tg.BROTLI_CODEC_ID]) + tg.compress(b"hello"), "shuffle")
    expect_artifact_error(tg.ARTIFACT_MAGIC + bytes([tg.BROTLI_CODEC_ID]) +
                          tg.compress(tg.byte_shuffle(b"hello world")), "PGQT")
    with pytest.raises(tg.ArtifactError, match="nope.ptz"):
        tg.read_artifact(str(tmp_path / "nope.ptz"))


def wrap_container(container: bytes) -> bytes:
    return tg.ARTIFACT_MAGIC + bytes([tg.BROTLI_CODEC_ID]) + tg.compress(tg.byte_shuffle(container))


def container(head: object, data: bytes = b"") -> bytes:
    h = json.dumps(head).encode()
    return tg.CONTAINER_MAGIC + len(h).to_bytes(4, "little") + h + data


def test_container_index_out_of_payload():
    head = {"version": 1, "tensors": [["a", "float32", [4], 8, 16]], "meta": {}, "extra": {}}
    expect_artifact_error(wrap_container(container(head, b"\0" * 16)), "outside the payload")
    head["tensors"][0][1] = "complex64"
    expect_artifact_error(wrap_container(container(head, b"\0" * 64)), "dtype")
    expect_artifact_error(wrap_container(tg.CONTAINER_MAGIC + (50).to_bytes(4, "little") + b"{not json"), "corrupt")


@pytest.mark.parametrize("head", [
    [1, 2],
    {"tensors": [["a", "float32"]], "meta": {}, "extra": {}},
    {"tensors": 5, "meta": {}, "extra": {}},
    {"tensors": [["a", "float32", [-1, -4], 0, 16]], "meta": {}, "extra": {}},
    {"tensors": [["a", "float32", [2.5], 0, 10]], "meta": {}, "extra": {}},
])
def test_structurally_invalid_header_is_artifact_error(head):
    expect_artifact_error(wrap_container(container(head, b"\0" * 16)))


class _SideEffect:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_loader_never_unpickles(tmp_path, monkeypatch, rt_cpu):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_SideEffect(probe)))
    assert probe.is_dir()  # the payload really has a side effect when unpickled
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model": _SideEffect(marker)})
    tbuf = io.BytesIO()
    torch.save({"model": _SideEffect(marker)}, tbuf)

    def boom(*a, **k):
        raise AssertionError("the artifact loader called an unpickler")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    h = dataclasses.replace(TINY, vocab_size=64)
    blobs = [payload, tbuf.getvalue(), tg.ARTIFACT_MAGIC + b"\x00" + tg.compress(payload),
             wrap_container(payload), wrap_container(tbuf.getvalue())]
    for blob in blobs:
        expect_artifact_error(blob)
        with pytest.raises(tg.ArtifactError):
            tg.load_model_from_artifact(h, rt_cpu, blob, "my.ptz")
    # a valid container whose tensor bytes are a pickle: loaded as plain bytes, never executed
    head = {"version": 1, "tensors": [["x", "uint8", [len(payload)], 0, len(payload)]], "meta": {}, "extra": {}}
    t, _, _ = tg.deserialize_artifact(wrap_container(container(head, payload)))
    assert bytes(t["x"].numpy()) == payload
    with pytest.raises(tg.ArtifactError, match="no tensor"):
        tg.load_model_from_artifact(h, rt_cpu, wrap_container(container(head, payload)), "my.ptz")
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_artifact(dataset):
    h, rt, model = perturbed_tiny_model(dataset)
    model.recurrence_active = True
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors, meta = tg.quantize_state_dict(h, rt, sd, {})
    extra = {"shape": {k: getattr(h, k) for k in tg.SHAPE_FIELDS}, "recurrence_active": True}
    return h, rt, tensors, meta, tg.serialize_artifact(tensors, meta, extra)


def test_load_model_from_artifact(tiny_artifact):
    h, rt, tensors, meta, blob = tiny_artifact
    m = tg.load_model_from_artifact(h, rt, blob, "a.ptz")
    assert m.recurrence_active is True
    ref = tg.dequantize_state_dict(tensors, meta, tg.build_model(h, rt).state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_loading_skips_the_random_init_and_does_not_alias_the_decoded_tensors(tiny_artifact, monkeypatch):
    h, rt, tensors, meta, blob = tiny_artifact
    decoded = tg.deserialize_artifact(blob, "a.ptz")

    def no_init(*a, **k):
        raise AssertionError("random init ran while loading an artifact")

    monkeypatch.setattr(tg.nn.init, "orthogonal_", no_init)
    monkeypatch.setattr(tg.GPT, "_init_weights", no_init)
    m1 = tg.model_from_decoded(h, rt, decoded, "a.ptz")
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(1.0)  # a stage adapting its copy must leave the next copy untouched
    m2 = tg.model_from_decoded(h, rt, decoded, "a.ptz")
    ref = tg.load_model_from_artifact(h, rt, blob, "a.ptz").state_dict()
    for k, v in m2.state_dict().items():
        assert torch.equal(v, ref[k]), k
        assert not torch.equal(m1.state_dict()[k], v), k


@pytest.mark.parametrize("override,name", [
    ({"num_layers": 5}, "NUM_LAYERS"), ({"model_dim": 128}, "MODEL_DIM"), ({"mlp_mult": 3.0}, "MLP_MULT"),
    ({"loop_end": 3}, "LOOP_END"), ({"parallel_start_layer": 0}, "PARALLEL_START_LAYER"),
    ({"smear_gate_enabled": False}, "SMEAR_GATE_ENABLED"), ({"vocab_size": 512}, "VOCAB_SIZE"), ({"rope_dims": 4}, "ROPE_DIMS"),
])
def test_load_with_mismatching_config_names_the_variable(tiny_artifact, override, name):
    h, rt, _, _, blob = tiny_artifact
    with pytest.raises(tg.ArtifactError, match=name) as ei:
        tg.load_model_from_artifact(dataclasses.replace(h, **override), rt, blob, "a.ptz")
    assert "a.ptz" in str(ei.value)


# ----------------------------------------------------------------------------- code size


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    src = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    p = tmp_path_factory.mktemp("pack") / "wrapper.py"
    p.write_text(tg.pack_code(src), encoding="utf-8")
    return p


def test_wrapper_is_small_and_counted_exactly(wrapper):
    text = wrapper.read_text(encoding="utf-8")
    assert text.startswith(tg.WRAPPER_HEAD)
    assert tg.code_size(str(wrapper)) == (text, len(text.encode("utf-8")))
    src_bytes = (REPO / "train_gpt.py").stat().st_size
    assert len(text.encode()) < src_bytes / 2
    # running unpacked, the counted size is the wrapper's, not the source's
    assert tg.code_size(str(REPO / "train_gpt.py"))[1] == len(text.encode())


def test_wrapper_repacks_itself_and_matches_cli_pack(wrapper, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(wrapper), "--pack", str(tmp_path / "again.py")], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again.py").read_bytes() == wrapper.read_bytes()
    r = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--pack", str(tmp_path / "cli.py")], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.py").read_bytes() == wrapper.read_bytes()
    assert str(len(wrapper.read_bytes())) in r.stdout


def test_wrapper_imports_as_the_same_program(wrapper):
    name = "pg_packed_wrapper"
    spec = importlib.util.spec_from_file_location(name, wrapper)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[name]
    assert mod.Hyperparameters() == mod.Hyperparameters.from_env({})
    assert [f.name for f in dataclasses.fields(mod.Hyperparameters)] == \
        [f.name for f in dataclasses.fields(tg.Hyperparameters)]
    assert dataclasses.asdict(mod.Hyperparameters()) == dataclasses.asdict(tg.Hyperparameters())
    public = {k for k, v in vars(tg).items() if callable(v) and getattr(v, "__module__", None) == tg.__name__}
    assert public <= set(vars(mod))
    # same behaviour: the packed pure functions agree with the original
    assert mod.plan_windows(1000, 128, 32) == tg.plan_windows(1000, 128, 32)
    blob = mod.serialize_artifact(sample_tensors(), META, EXTRA)
    assert blob == tg.serialize_artifact(sample_tensors(), META, EXTRA)
    assert mod.__doc__ is None  # docstrings and comments are stripped from the counted code


def test_strip_source_keeps_the_program():
    src = 'def f(x):\n    """doc"""\n    # comment\n    return x + 1\n\nclass A:\n    """doc"""\n'
    out = tg.strip_source(src)
    assert "doc" not in out and "comment" not in out
    ns: dict = {}
    exec(out, ns)
    assert ns["f"](1) == 2 and isinstance(ns["A"](), ns["A"])


def test_run_reports_code_plus_model_bytes(tiny_artifact, tmp_path, rt_cpu):
    """run() on a checkpoint (no training): results total = wrapper bytes + artifact file bytes."""
    h = tiny_artifact[0]
    torch.manual_seed(1)
    model = tg.build_model(h, rt_cpu)
    ck = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "hessians": {}, "recurrence_active": False}, ck)
    h = dataclasses.replace(h, load_checkpoint=str(ck), artifact_path=str(tmp_path / "m.ptz"), ttt_enabled=False,
                            etlb_enabled=False, ngram_tilt=False, checkpoint_path="")
    tg.configure_logging(None, False)
    res = tg.run(h, rt_cpu)
    code = tg.pack_code((REPO / "train_gpt.py").read_text(encoding="utf-8"))
    assert res["code_bytes"] == len(code.encode()) == tg.code_size()[1]
    assert res["model_bytes"] == (tmp_path / "m.ptz").stat().st_size
    assert res["total_bytes"] == res["code_bytes"] + res["model_bytes"]
    assert res["fits"] is True and res["legal"] is True
    assert res["final_metric"] == "final_int6_sliding_window"
    assert 0 < res["final_bpb"] < 20
