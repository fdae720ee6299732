"""aimv2-train never loses or silently ruins a run: one run per folder (an OS lock), no reuse of a folder that
holds a run without --resume or --restart, no silent schedule change on resume, a diverging run stops with exit
status 1 and no checkpoint of its bad state, and every bad flag is one line, not a traceback."""
import dataclasses
import fcntl
import json
import math
import os

import pytest
import torch

from aimv2.checkpoint import list_checkpoints
from aimv2.train import TrainConfig, Trainer, main


def _args(out, *extra):
    return ["--preset", "aimv2-tiny", "--out", str(out), "--batch-size", "4", "--log-every", "1",
            "--device", "cpu", "--no-progress", *extra]


def _without_banner(lines: list[str]) -> list[str]:
    """stderr without the start-of-run banner (its first line names the preset; the rest are indented)."""
    if lines and lines[0].startswith("aimv2-train: preset "):
        lines = lines[1:]
        while lines and lines[0].startswith("  "):
            lines = lines[1:]
    return lines


def _one_line(capsys) -> str:
    err = _without_banner(capsys.readouterr().err.strip().splitlines())
    assert len(err) == 1, err
    return err[0]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's errors
        return exc.code


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- one run per folder -------------------------------------------------------------------------------------

def test_second_trainer_on_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another trainer's lock, held from this process
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(_args(out, "--steps", "1")) == 1
        line = _one_line(capsys)
        assert "in use" in line and str(out) in line
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # released (as the kernel does when the holder dies): the folder is usable again
    assert main(_args(out, "--steps", "1")) == 0


def test_reused_folder_is_refused_and_restart_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2", "--ckpt-every", "2")) == 0
    old_metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _exit_code(_args(out, "--steps", "2")) == 2
    line = _one_line(capsys)
    assert "--resume" in line and "--restart" in line and str(out) in line
    assert (out / "metrics.jsonl").read_text() == old_metrics  # untouched

    assert main(_args(out, "--steps", "1", "--restart")) == 0
    assert "moved the previous run" in capsys.readouterr().err
    previous = sorted(out.glob("previous-*"))
    assert len(previous) == 1
    assert (previous[0] / "metrics.jsonl").read_text() == old_metrics
    assert [p.name for p in list_checkpoints(previous[0] / "checkpoints")] == ["step_00000002"]
    assert _steps(out) == [1]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000001"]
    assert _exit_code(_args(out, "--steps", "1", "--restart", "--resume")) == 2  # one or the other


def test_resume_with_another_steps_needs_new_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2", "--ckpt-every", "2")) == 0
    capsys.readouterr()
    assert main(_args(out, "--steps", "3", "--resume")) == 2
    line = _one_line(capsys)
    assert "--steps 3" in line and "2 steps" in line and "--new-schedule" in line
    assert _steps(out) == [1, 2]

    assert main(_args(out, "--steps", "3", "--resume", "--new-schedule")) == 0
    err = capsys.readouterr().err
    assert "schedule of 2 steps is rebuilt for 3 steps" in err
    assert _steps(out) == [1, 2, 3]
    assert _exit_code(_args(out, "--steps", "3", "--new-schedule")) == 2  # only with --resume


# -- divergence ---------------------------------------------------------------------------------------------

def _poison_from(monkeypatch, first_bad_call: int, last_bad_call: float = math.inf):
    """Make AIMv2's forward return NaN losses (still differentiable) on calls first_bad..last_bad (1-based)."""
    from aimv2.model import AIMv2

    forward, calls = AIMv2.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls[0] += 1
        if first_bad_call <= calls[0] <= last_bad_call:
            nan = torch.tensor(float("nan"))
            out = dataclasses.replace(out, loss=out.loss * nan, loss_img=out.loss_img * nan,
                                      loss_txt=out.loss_txt * nan)
        return out

    monkeypatch.setattr(AIMv2, "forward", poisoned)


def test_a_non_finite_step_updates_nothing_and_is_counted(tmp_path, monkeypatch):
    _poison_from(monkeypatch, 2, 2)
    trainer = Trainer(TrainConfig(preset="aimv2-tiny", out=str(tmp_path / "run"), steps=5, batch_size=4,
                                  lr=3e-3, warmup_steps=1, device="cpu", progress=False))
    assert "skipped_update" not in trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = trainer.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    m = trainer.train_step()
    assert m["skipped_update"] and m["bad_steps"] == 1 and math.isnan(m["loss"])
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], opt_before)
    m = trainer.train_step()  # finite again: updates, the streak is over
    assert "skipped_update" not in m and math.isfinite(m["loss"]) and trainer.bad_streak == 0
    assert trainer.bad_steps == 1 and trainer.step == 3


def test_a_diverging_run_stops_after_max_bad_steps_without_a_bad_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_from(monkeypatch, 3)  # steps 1-2 are finite, every later one is NaN
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "20", "--ckpt-every", "1", "--max-bad-steps", "3")) == 1
    line = _one_line(capsys)
    assert "diverged" in line and "3 consecutive steps (3-5)" in line and "step_00000002" in line
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000001", "step_00000002"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [bool(r.get("skipped_update")) for r in rows] == [False, False, True, True, True]
    assert rows[-1]["bad_steps"] == 3


@pytest.mark.slow
def test_a_huge_lr_stops_the_run_and_leaves_only_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "30", "--ckpt-every", "1", "--lr", "1e30", "--warmup-steps", "0",
                      "--max-bad-steps", "2")) == 1
    assert "diverged" in _one_line(capsys)
    for ckpt in list_checkpoints(out / "checkpoints"):
        trainer = Trainer(TrainConfig(preset="aimv2-tiny", out=str(out), steps=30, batch_size=4, lr=1e30,
                                      warmup_steps=0, device="cpu", progress=False))
        trainer.resume(str(ckpt))
        assert trainer.parameters_finite(), ckpt


# -- flags --------------------------------------------------------------------------------------------------

def test_lr_must_be_finite_and_positive(tmp_path, capsys):
    for value in ("inf", "nan", "0", "-1e-3", "-inf"):
        assert _exit_code(_args(tmp_path / "x", "--steps", "1", f"--lr={value}")) == 2, value
        assert "--lr must be a finite number > 0" in _one_line(capsys)
    assert not (tmp_path / "x").exists()


def test_bad_flag_values_are_one_line_usage_errors(tmp_path, capsys):
    for argv, needle in ((["--warmup-steps", "5"], "--warmup-steps must be in [0, --steps 2]"),
                         (["--warmup-steps", "-1"], "--warmup-steps"),
                         (["--max-bad-steps", "0"], "--max-bad-steps must be at least 1"),
                         (["--seed", "-1"], "--seed"),
                         (["--data", "/dev/null"], "--data /dev/null: neither a file nor a folder"),
                         (["--new-schedule"], "--new-schedule applies only with --resume"),
                         (["--log-every", "0"], "--log-every"),
                         (["--ckpt-every", "0"], "--ckpt-every"),
                         (["--batch-size", "0"], "--batch-size"),
                         (["--workers", "-2"], "--workers"),
                         (["--native-budgets", "3"], "--native-budgets"),
                         (["--steps", "x"], "--steps")):
        assert _exit_code(_args(tmp_path / "x", "--steps", "2", *argv)) == 2, argv
        assert needle in _one_line(capsys), argv
    assert not (tmp_path / "x").exists()


def test_batch_size_must_divide_among_the_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _exit_code(_args(tmp_path / "x", "--steps", "1")) == 2
    assert "--batch-size 4" in _one_line(capsys)


def test_unusable_backend_is_refused_before_training(tmp_path, monkeypatch, capsys):
    assert main(_args(tmp_path / "x", "--steps", "1", "--backend", "cuda")) == 2  # CPU tensors
    line = _one_line(capsys)
    assert "--backend cuda" in line
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton on CPU tensors runs only through the interpreter
    assert main(_args(tmp_path / "y", "--steps", "1", "--backend", "triton")) == 2
    assert "--backend triton" in _one_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_out_that_is_not_a_writable_folder_is_an_operational_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(_args(tmp_path / "file", "--steps", "1")) == 1
    assert "--out" in _one_line(capsys)
    assert main(_args(tmp_path / "file" / "run", "--steps", "1")) == 1
    assert "--out" in _one_line(capsys)
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_an_operational_error(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(_args(locked, "--steps", "1")) == 1
        assert "not writable" in _one_line(capsys)
    finally:
        locked.chmod(0o700)


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next_start(tmp_path, capsys, monkeypatch):
    """A .tmp-* (save cut short) and a .del-* (pruning cut short) are gone when the next start loads its
    checkpoint (before it writes anything); complete checkpoints stay."""
    import aimv2.train as train_module
    seen_at_load = []
    real_load = train_module.load_checkpoint

    def load_and_look(path, *args, **kwargs):
        seen_at_load.extend(p.name for p in (out / "checkpoints").iterdir())
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(train_module, "load_checkpoint", load_and_look)
    out = tmp_path / "run"
    assert main(_args(out, "--steps", "2", "--ckpt-every", "2")) == 0
    ckpts = out / "checkpoints"
    kept = [p.name for p in list_checkpoints(ckpts)]
    for name in (".tmp-step_00000009", ".del-step_00000001"):
        (ckpts / name / "dcp").mkdir(parents=True)
        (ckpts / name / "dcp" / "__0_0.distcp").write_bytes(b"partial")
    assert main(_args(out, "--steps", "3", "--resume", "--new-schedule")) == 0
    assert seen_at_load and not any(n.startswith((".tmp-", ".del-")) for n in seen_at_load), seen_at_load
    names = sorted(p.name for p in ckpts.iterdir())
    assert not any(n.startswith((".tmp-", ".del-")) for n in names), names
    assert set(kept) <= set(names)


# -- a full disk ---------------------------------------------------------------------------------------------

def _mount_tmpfs(path, size: int) -> bool:
    """A tmpfs of ``size`` bytes at ``path``; False where this process may not mount (not root, no privilege)."""
    import subprocess
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_names_the_last_good_checkpoint_and_resume_works_after(tmp_path, capsys):
    """A real full disk (a small tmpfs; root only): the save that does not fit ends the run with one line saying
    "no space left on device" and naming the last good checkpoint, leaves no partial checkpoint, and after the
    space is freed (the tmpfs grown) --resume carries on from that checkpoint."""
    import shutil
    import subprocess
    # Size of one checkpoint of this run, measured on the ordinary disk.
    probe = tmp_path / "probe"
    assert main(_args(probe, "--steps", "2", "--ckpt-every", "2")) == 0
    step = list_checkpoints(probe / "checkpoints")[-1]
    one = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    other = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file() and step not in f.parents)
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, int(1.5 * one) + other + (1 << 16)):
        pytest.skip("needs root and a mountable tmpfs")
    try:
        out = disk / "run"
        capsys.readouterr()
        assert main(_args(out, "--steps", "4", "--ckpt-every", "2")) == 1  # step 4's checkpoint does not fit
        line = _one_line(capsys)
        assert "no space left on device" in line and "step_00000002" in line, line
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["step_00000002"], names  # no partial checkpoint left behind
        subprocess.run(["mount", "-o", f"remount,size={4 * one + other + (1 << 20)}", str(disk)], check=True)
        assert main(_args(out, "--steps", "4", "--ckpt-every", "2", "--resume")) == 0
        assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_00000004"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)
