"""Real processes: torchrun + FSDP2 on gloo against one process, resume on another world size, and SIGKILL.

Every run here is a real ``python -m aimv2.train`` (or ``torchrun -m aimv2.train``) subprocess on the aimv2-tiny
preset, one thread per process, so the CPU arithmetic is the same from run to run; the run killed inside a
checkpoint is a script that slows the checkpoint down and then calls ``aimv2.train.main``.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimv2.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow

# Two ranks reduce the same sums in another order (FSDP's reduce-scatter, the all-reduced loss counts and
# grad norm), so they agree with one rank to fp32 rounding, not bitwise. Five AdamW steps amplify a few ulps
# (seen: 2e-8 relative); 1e-5 leaves room for another machine's summation order and still fails any real
# difference (a wrong batch split or a per-rank mean instead of the global mean moves the loss by >1e-3).
RTOL = 1e-5
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _train_flags(out: Path, steps: int, *extra: str) -> list[str]:
    return ["--preset", "aimv2-tiny", "--steps", str(steps), "--batch-size", "8", "--log-every", "1",
            "--ckpt-every", "3", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["-m", "aimv2.train", *_train_flags(out, steps, *extra)]


def _run(argv: list[str], nproc: int = 1, **kw) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(nproc)]
    proc = subprocess.run(launcher + argv, env=kw.pop("env", ENV), capture_output=True, text=True, timeout=240, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict], keys=("loss", "loss_img", "loss_txt", "grad_norm")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=RTOL, abs=0), (ra["step"], key, ra[key], rb[key])


def test_two_ranks_match_one_rank_and_resume_on_another_world_size(tmp_path):
    """torchrun 2 ranks (FSDP2, gloo) == 1 process at the same global batch over 5 steps; the 2-rank step-3
    checkpoint resumed by 1 process continues with the same losses as the straight 1-process run."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    _run(_train_args(one, 5))
    proc = _run(_train_args(two, 5), nproc=2)
    assert "loss" in proc.stdout  # rank 0 prints the summary once
    config = json.loads((two / "config.json").read_text())
    assert config["world_size"] == 2
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_one] == [1, 2, 3, 4, 5]
    _close(rows_one, rows_two)
    assert len({r["loss"] for r in rows_one}) == 5  # the losses move: the comparison is not of constants

    # the checkpoint is sharded: one DCP file per rank
    ckpt = two / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    _run(_train_args(resumed, 5, "--resume", str(ckpt)))
    _close(rows_one[3:], _rows(resumed))


def _wait(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the moment to kill it: "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill the run")
        time.sleep(0.005)


# A script that runs aimv2-train (aimv2.train.main, the console script's entry point) with every checkpoint
# pausing between writing its DCP shards and completing (rng files, state.json, the rename into place), so a test
# can SIGKILL a real run while a checkpoint is half written.
_SLOW_CHECKPOINT = """\
import sys
import time

sys.path.insert(0, {root!r})
import torch.distributed.checkpoint as dcp

from aimv2.train import main

_save = dcp.save


def _save_then_pause(*args, **kwargs):
    result = _save(*args, **kwargs)
    time.sleep({pause})
    return result


dcp.save = _save_then_pause  # aimv2.checkpoint.save_checkpoint looks dcp.save up at each call
if __name__ == "__main__":
    sys.exit(main())
"""


def _slow_checkpoint_script(tmp_path: Path, pause: float) -> Path:
    import aimv2

    script = tmp_path / "train_slow_checkpoint.py"
    script.write_text(_SLOW_CHECKPOINT.format(root=str(Path(aimv2.__file__).resolve().parents[1]), pause=pause))
    return script


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def test_sigkill_at_any_moment_resumes_to_the_same_losses(tmp_path):
    """Kill a real run with SIGKILL in the middle of writing a checkpoint, then again at a random moment
    between steps; each time resume from the newest complete checkpoint. The logged losses of steps 1..12
    equal those of an uninterrupted run, exactly (same arithmetic on the same data and state)."""
    steps = 12
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_train_args(straight, steps))
    expected = _rows(straight)

    # 1. SIGKILL while the step-6 checkpoint is half written: its shards are on disk, state.json is not,
    #    and it still has its temporary name.
    launch = [sys.executable, str(_slow_checkpoint_script(tmp_path, pause=2.0)), *_train_flags(killed, steps)]
    proc = subprocess.Popen(launch, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    ckpts = killed / "checkpoints"
    _wait(lambda: (ckpts / ".tmp-step_00000006" / "dcp" / ".metadata").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    half = ckpts / ".tmp-step_00000006"
    assert half.is_dir() and not (half / "state.json").exists()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000003"]  # the half-written one is never picked

    # 2. Resume, and SIGKILL again at a random moment after step 8 was logged.
    proc = subprocess.Popen([sys.executable] + _train_args(killed, steps, "--resume"), env=ENV,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    _wait(lambda: _steps_logged(killed) >= 8, proc)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / ".tmp-step_00000006").exists()  # the next save cleaned the half-written folder

    # 3. Resume to the end.
    proc = _run(_train_args(killed, steps, "--resume"))
    assert "resumed from" in proc.stderr
    got = _rows(killed)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for want, have in zip(expected, got):
        for key in ("loss", "loss_img", "loss_txt", "grad_norm", "lr"):
            assert have[key] == want[key], (want["step"], key, want[key], have[key])


_COUNT_REDUCTIONS = """
import atexit, os, sys
sys.path.insert(0, {root!r})
from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

from aimv2.train import main

calls = [0]
_reduce = group.foreach_reduce


def _counted(*args, **kwargs):
    calls[0] += 1
    return _reduce(*args, **kwargs)


group.foreach_reduce = _counted  # FSDPParamGroup.post_backward looks it up at each call
atexit.register(lambda: open(os.path.join({out!r}, "reductions-" + os.environ["RANK"]), "w").write(str(calls[0])))
if __name__ == "__main__":
    sys.exit(main())
"""


def test_two_ranks_with_micro_batches_and_activation_checkpointing_match_one_rank(tmp_path):
    """torchrun 2 ranks, 2 micro-batches of 2 per rank and selective activation checkpointing == 1 process with
    the whole batch of 8 at once, to fp32 rounding; and FSDP2 reduce-scatters the gradients once per step (one
    reduction per FSDP unit: 3 blocks + the root), not once per micro-batch."""
    import aimv2

    one, two = tmp_path / "one", tmp_path / "two"
    steps = 4
    _run(_train_args(one, steps))
    two.mkdir()
    script = tmp_path / "count_reductions.py"
    script.write_text(_COUNT_REDUCTIONS.format(root=str(Path(aimv2.__file__).resolve().parents[1]), out=str(two)))
    _run([str(script), *_train_flags(two, steps, "--micro-batch-size", "2", "--activation-checkpointing",
                                     "selective")], nproc=2)
    rows_one, rows_two = _rows(one), _rows(two)
    assert all(r["micro_batches"] == 2 for r in rows_two) and all(r["micro_batches"] == 1 for r in rows_one)
    _close(rows_one, rows_two)
    assert len({r["loss"] for r in rows_one}) == steps
    units = 2 + 1 + 1  # aimv2-tiny: 2 encoder blocks, 1 decoder block, the root
    for rank in (0, 1):
        assert int((two / f"reductions-{rank}").read_text()) == units * steps
