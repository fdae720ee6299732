"""Training: a short CPU run whose loss falls, exact resume, checkpoints and CLI errors."""
import json
import subprocess
import sys

import pytest
import torch

from aimv2.checkpoint import CheckpointError, find_checkpoint, list_checkpoints
from aimv2.train import TrainConfig, Trainer, lr_at, main, param_groups, run


def _cfg(tmp_path, **kw):
    base = dict(preset="aimv2-tiny", out=str(tmp_path / "run"), steps=30, batch_size=8, lr=3e-3, warmup_steps=3,
                log_every=1, ckpt_every=10, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_thirty_steps_loss_falls(tmp_path):
    summary = run(_cfg(tmp_path))
    rows = [json.loads(line) for line in summary["metrics"].read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "loss_img", "loss_txt", "lr", "images_per_s"):
        assert key in rows[0]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert summary["plot"].exists() and summary["plot"].stat().st_size > 10_000
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000020",
                                                                                  "step_00000030"]


def test_resume_continues_exactly(tmp_path):
    """Train 6 steps straight; train 4, save, rebuild from the checkpoint, train 2: identical losses."""
    straight = Trainer(_cfg(tmp_path / "a", steps=6))
    losses = [straight.train_step()["loss"] for _ in range(6)]

    first = Trainer(_cfg(tmp_path / "b", steps=6))
    for _ in range(4):
        first.train_step()
    first.save()
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    resumed = Trainer(_cfg(tmp_path / "b", steps=6, resume="latest"))
    resumed.resume("latest")
    assert resumed.step == 4
    after = [resumed.train_step()["loss"] for _ in range(2)]
    assert after == losses[4:]


@pytest.mark.slow
def test_cli_resume_appends_metrics(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "aimv2-tiny", "--out", str(out), "--batch-size", "4", "--ckpt-every", "5",
            "--log-every", "1", "--device", "cpu", "--no-progress"]
    assert main(args + ["--steps", "5"]) == 0
    assert main(args + ["--steps", "8", "--resume", "--new-schedule"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    printed = capsys.readouterr().out
    assert "metrics:" in printed and "checkpoint:" in printed and "loss.png" in printed


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    trainer = Trainer(_cfg(tmp_path, steps=3))
    for _ in range(3):
        trainer.train_step()
        trainer.save()
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step_00000009-1").mkdir()  # a half-written checkpoint is never picked
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert find_checkpoint(tmp_path / "run").name == "step_00000003"


def test_resume_errors_are_clear(tmp_path, capsys):
    args = ["--preset", "aimv2-tiny", "--out", str(tmp_path / "none"), "--steps", "2", "--device", "cpu",
            "--no-progress", "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0]

    trainer = Trainer(_cfg(tmp_path, steps=1))
    trainer.train_step()
    path = trainer.save()
    shard = path / "dcp" / "__0_0.distcp"
    shard.write_bytes(b"\x00garbage" + shard.read_bytes()[100:])
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(_cfg(tmp_path, steps=2)).resume("latest")
    (path / "dcp" / ".metadata").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(_cfg(tmp_path, steps=2)).resume("latest")
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        Trainer(_cfg(tmp_path, steps=2)).resume("latest")


def test_resume_refuses_other_preset(tmp_path):
    trainer = Trainer(_cfg(tmp_path, steps=1))
    trainer.train_step()
    trainer.save()
    with pytest.raises(CheckpointError, match="aimv2-tiny|does not fit"):
        Trainer(_cfg(tmp_path, preset="aimv2-demo", batch_size=2)).resume("latest")


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "aimv2-giant"], "unknown preset"),
    (["--steps", "0"], "--steps"),
    (["--bogus"], "unrecognized arguments"),
    (["--backend", "fast"], "--backend"),
    (["--device", "tpu"], "--device"),
    (["--lr", "-1"], "--lr"),
])
def test_cli_rejects_bad_flags_with_one_line(argv, needle, tmp_path):
    cmd = [sys.executable, "-m", "aimv2.train", "--out", str(tmp_path / "x"), "--no-progress", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_schedule_and_param_groups():
    cfg = TrainConfig(steps=100, warmup_steps=10, init_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, cfg, 1e-3) == pytest.approx(1e-6)
    assert lr_at(10, cfg, 1e-3) == pytest.approx(1e-3)
    assert lr_at(100, cfg, 1e-3) == pytest.approx(1e-5)
    assert 1e-5 < lr_at(55, cfg, 1e-3) < 1e-3
    from aimv2 import AIMv2, AIMv2Config
    model = AIMv2(AIMv2Config.from_name("aimv2-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.preprocessor.pos_embed" in no_decay_names and "decoder.start_token" in no_decay_names
    assert "decoder.text_pos_embed" in no_decay_names and "encoder.preprocessor.patchifier.proj.bias" in no_decay_names
    assert all("norm" in n or "bias" in n or "pos_embed" in n or "start_token" in n for n in no_decay_names)
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "decoder.text_embedding.weight" in decay_names and decay["weight_decay"] == 0.1
