"""tools/probe_study.py (the trained-vs-random study behind the README's probe table) runs in both modes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "probe_study.py"


@pytest.mark.parametrize("mode", ["pretrain", "supervised"])
def test_probe_study_runs(mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(TOOL), "--mode", mode, "--steps", "3", "--snap", "1",
                          "--batch-size", "4", "--probe-train", "40", "--probe-test", "20"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["step"] for r in rows] == [1, 3] and all(r["mode"] == mode for r in rows)
    for r in rows:
        for k in ("trained_top1", "random_top1", "trained_train_top1", "random_train_top1"):
            assert 0 <= r[k] <= 100
    losses = ("loss_img", "loss_txt") if mode == "pretrain" else ("loss_ce",)
    assert all(r[k] > 0 for r in rows for k in losses)
    assert rows[0]["random_top1"] == rows[1]["random_top1"]  # the same random trunk and probe seed each time


def test_probe_study_bad_flags():
    out = subprocess.run([sys.executable, str(TOOL), "--snap", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--snap must be comma-separated ints" in out.stderr
