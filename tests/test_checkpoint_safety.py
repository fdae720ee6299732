"""Training checkpoints are safe to load and safe to write: nothing loaded can run code (payloads planted in every
file a load reads are refused with a one-line CheckpointError naming the file), a save round-trips the state and
the RNG streams, a non-finite tensor is never written, leftovers are cleaned, and a full disk is one clear line."""
import dataclasses
import errno
import io
import json
import os
import pathlib
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import aimv2.checkpoint as ckpt
from aimv2.checkpoint import (
    CheckpointError,
    clean_leftovers,
    list_checkpoints,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from aimv2.config import AIMv2Config
from aimv2.train import TrainConfig


class _Touch:
    """Unpickling this creates ``marker``: the stand-in for code a checkpoint must never run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    model.register_buffer("scale", torch.ones(3, dtype=torch.bfloat16))  # more dtypes in DCP's metadata
    model.register_buffer("count", torch.arange(2, dtype=torch.int64))
    return model


def _trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _state(step: int = 5) -> dict:
    return {"step": step, "bad_steps": 0, "loader": {"epoch": 1, "batch": 7, "position": 56}, "world_size": 1,
            "train_config": TrainConfig(preset="aimv2-tiny", steps=9, progress=False),
            "model_config": AIMv2Config.from_name("aimv2-tiny").to_dict()}


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _saved(tmp_path, step: int = 5, **kw) -> tuple[pathlib.Path, torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = _trained(model)
    path = save_checkpoint(tmp_path / "checkpoints", step, model, opt, _state(step), **kw)
    return path, model, opt


def _assert_one_line(exc: pytest.ExceptionInfo, file: pathlib.Path) -> None:
    message = str(exc.value)
    assert exc.type is CheckpointError
    assert len(message.splitlines()) == 1, message
    assert str(file) in message, message


# -- round trip ---------------------------------------------------------------------------------------------
def test_save_load_round_trips_state_model_optimizer_and_rng(tmp_path):
    path, model, opt = _saved(tmp_path)
    after_save = _draws()
    names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert names == ["dcp/.metadata", "dcp/__0_0.distcp", "rng_rank0.safetensors", "state.json"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no .tmp-* or .del-* left

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert _draws() == after_save  # the next random numbers are those that followed the save

    assert state["step"] == 5 and state["loader"] == {"epoch": 1, "batch": 7, "position": 56}
    assert state["world_size"] == 1 and state == read_state(path)
    assert AIMv2Config.from_dict(state["model_config"]) == AIMv2Config.from_name("aimv2-tiny")
    train = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["train_config"].items()})
    assert train == TrainConfig(preset="aimv2-tiny", steps=9, progress=False)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert fresh_opt.param_groups[0]["lr"] == 1e-2 and fresh_opt.param_groups[0]["betas"] == (0.9, 0.95)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])


def test_state_must_be_json_data(tmp_path):
    model = _model()
    with pytest.raises(CheckpointError, match=r"state\.loader\.when is a object"):
        save_checkpoint(tmp_path / "c", 1, model, None, {"step": 1, "loader": {"when": object()}})
    assert not (tmp_path / "c").exists()


# -- nothing loaded runs code ---------------------------------------------------------------------------------
def _payload(marker: pathlib.Path) -> bytes:
    data = pickle.dumps(_Touch(marker))
    pickle.loads(data)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    return data


@pytest.mark.parametrize("name", ["state.json", "rng_rank0.safetensors", "dcp/.metadata"])
def test_a_pickle_payload_in_place_of_any_file_is_refused(tmp_path, name):
    path, _, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    (path / name).write_bytes(_payload(marker))
    model = _model()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()
    _assert_one_line(exc, path / name)


def test_a_payload_injected_into_dcp_metadata_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    marker, meta_file = tmp_path / "ran", path / "dcp" / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # written by this test: trusted
    meta.storage_meta.modules = [_Touch(marker)]
    meta_file.write_bytes(pickle.dumps(meta))
    for load in (lambda: load_checkpoint(path, _model()),
                 lambda: ckpt.load_trained_encoder(path)):  # every reader of the metadata
        with pytest.raises(CheckpointError) as exc:
            load()
        assert not marker.exists()
        _assert_one_line(exc, meta_file)
        assert "pathlib.Path.touch" in str(exc.value)


def test_a_payload_in_the_optimizer_shard_is_refused(tmp_path, monkeypatch):
    """DCP reads non-tensor values (the optimizer's param groups) with torch.load(weights_only=False)."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    state_dicts = ckpt._state_dicts

    def with_payload(model, optimizer):
        sd = state_dicts(model, optimizer)
        if optimizer is not None:
            sd["optim"]["param_groups"][0]["lr"] = _Touch(marker)
        return sd

    monkeypatch.setattr(ckpt, "_state_dicts", with_payload)
    path, _, _ = _saved(tmp_path)
    monkeypatch.setattr(ckpt, "_state_dicts", state_dicts)
    assert not marker.exists()

    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, model, opt)
    assert not marker.exists()
    _assert_one_line(exc, path / "dcp" / "__0_0.distcp")

    with ckpt._quiet_single_process():  # control: DCP's own planner runs it
        dcp.load(ckpt._state_dicts(model, opt), checkpoint_id=str(path / "dcp"))
    assert marker.exists()


def test_old_pickle_checkpoints_are_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    (path / "state.json").unlink()
    (path / "state.pt").write_bytes(_payload(marker))
    with pytest.raises(CheckpointError, match="old format") as exc:
        load_checkpoint(path, _model())
    assert not marker.exists() and len(str(exc.value).splitlines()) == 1 and str(path) in str(exc.value)


def test_the_metadata_allow_list_is_what_dcp_writes(tmp_path):
    """Every global in a real ``.metadata`` is allowed; nothing allowed is beyond what it uses (and dtypes)."""
    path, _, _ = _saved(tmp_path)
    used = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            used.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO((path / "dcp" / ".metadata").read_bytes())).load()
    dtypes = {(m, n) for m, n in used if m == "torch" and isinstance(getattr(torch, n), torch.dtype)}
    assert used - dtypes <= ckpt.DCP_METADATA_GLOBALS
    assert {("torch", "bfloat16"), ("torch", "int64"), ("torch", "float32")} <= dtypes


# -- never written: non-finite tensors -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["parameter", "optimizer"])
def test_a_non_finite_tensor_is_never_written(tmp_path, where):
    model = _model()
    opt = _trained(model)
    save_checkpoint(tmp_path / "checkpoints", 1, model, opt, _state(1))
    with torch.no_grad():
        if where == "parameter":
            model[2].weight[1, 3] = float("nan")
        else:
            opt.state[model[0].bias]["exp_avg"][0] = float("inf")
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(tmp_path / "checkpoints", 2, model, opt, _state(2))
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and "not finite" in message
    assert ("2.weight" if where == "parameter" else "exp_avg of 0.bias") in message
    assert "step_00000001" in message  # the last good checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


# -- leftovers ----------------------------------------------------------------------------------------------------
def test_clean_leftovers_removes_tmp_and_del_folders_only(tmp_path):
    path, _, _ = _saved(tmp_path, step=3)
    root = path.parent
    shutil.copytree(path, root / ".tmp-step_00000004")
    shutil.copytree(path, root / ".del-step_00000002")
    (root / ".tmp-stray").write_text("x")
    removed = clean_leftovers(root)
    assert sorted(p.name for p in removed) == [".del-step_00000002", ".tmp-step_00000004", ".tmp-stray"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
    assert clean_leftovers(root) == [] and clean_leftovers(tmp_path / "nothing") == []


def test_a_load_writes_nothing(tmp_path, monkeypatch):
    """After a full disk: the leftovers of a crashed save are still there, every write fails, yet resuming
    loads; the folder is exactly as before."""
    path, model, _ = _saved(tmp_path)
    shutil.copytree(path, path.parent / ".tmp-step_00000006")

    def tree():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    before = tree()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            full()
        return real_open(file, mode, *args, **kwargs)

    for name in ("mkdir", "makedirs", "rename", "replace", "remove", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, full)
    monkeypatch.setattr(shutil, "rmtree", full)
    monkeypatch.setattr("builtins.open", read_only_open)
    fresh = _model()
    load_checkpoint(path, fresh, torch.optim.AdamW(fresh.parameters()))
    monkeypatch.undo()
    assert tree() == before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


# -- full disk ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,code", [("rng", errno.ENOSPC), ("state", errno.ENOSPC), ("dcp", errno.ENOSPC),
                                        ("state", errno.EDQUOT)])
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, where, code):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    good, model, opt = _saved(tmp_path, step=1)
    root = good.parent

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "dcp":
        monkeypatch.setattr(dcp_fs, "_write_item", full)
    else:
        write_file = ckpt._write_file
        name = "state.json" if where == "state" else "rng_rank0.safetensors"
        monkeypatch.setattr(ckpt, "_write_file",
                            lambda p, data: full() if p.name == name else write_file(p, data))
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(root, 2, model, opt, _state(2))
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and "no space left on device" in message, message
    assert str(good) in message and "step_00000002" in message
    assert list_checkpoints(root) == [good] and sorted(p.name for p in root.iterdir()) == ["step_00000001"]

    monkeypatch.undo()  # space again: the next save works, the good one still loads
    save_checkpoint(root, 2, model, opt, _state(2))
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001", "step_00000002"]
    assert load_checkpoint(good, _model())["step"] == 1


def test_json_keeps_dataclass_fields_exactly():
    cfg = AIMv2Config.from_name("aimv2-tiny")
    text = ckpt._state_text({"model_config": cfg, "x": (1, 2.5, None), "p": pathlib.Path("a/b")})
    back = json.loads(text)
    assert back == {"model_config": dataclasses.asdict(cfg), "x": [1, 2.5, None], "p": "a/b"}
