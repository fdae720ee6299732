"""The benchmark harness (bench/): a --quick smoke run of bench/run.py that checks its output files, the
pytest-benchmark file run once per case, bad flags, and the harness's pure helpers. No timing assertions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

CHECK_VALUES = os.environ.get("AIMV2_CHECK_VALUES")
import harness  # noqa: E402
import run  # noqa: E402

OPS = ("patch_mse_loss", "prefix_attention", "linear_cross_entropy", "cross_entropy")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "AIMV2_POISON_OUTPUTS")}
    return env | {"PYTHONPATH": str(ROOT)}


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "run.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run("--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plots(quick_run):
    stems = sorted(p.name for p in quick_run.iterdir())
    stem = next(s[:-5] for s in stems if s.endswith(".json"))
    assert stem.startswith("cpu-") and stem.endswith("-quick")
    data = json.loads((quick_run / f"{stem}.json").read_text())
    env, rows = data["environment"], data["results"]
    assert env["device"] == "cpu" and env["quick"] is True and env["torch"] == torch.__version__
    for op in OPS:
        module = run.OPS[op]
        runnable = [p for p, why in module.providers(torch.device("cpu")).items() if why is None]
        assert {"reference", "reference-compiled"} <= set(runnable)
        op_rows = [r for r in rows if r["op"] == op]
        # Every runnable provider on every quick config and mode, each timed (none failed).
        expected = {(c.name, p, m) for c in module.configs(torch.device("cpu"), True) for p in runnable
                    for m in harness.MODES}
        assert {(r["config"], r["provider"], r["mode"]) for r in op_rows} == expected
        for r in op_rows:
            assert r["error"] is None, r
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0, r
            assert r["derived"] and all(v > 0 for v in r["derived"].values()), r
        # The providers that cannot run here are named with the reason.
        not_run = [p for p, why in module.providers(torch.device("cpu")).items() if why is not None]
        assert all(any(line.startswith(f"not run: {p} (") for line in env["notes"][op]) for p in not_run)
        png = quick_run / f"{stem}-{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (quick_run / f"{stem}.md").read_text()
    for op in OPS:
        assert f"## {op}" in md
    assert md.count("| reference | ") >= len(OPS) and "x ref" in md


@pytest.mark.slow
def test_rerun_of_one_op_keeps_the_other_ops(quick_run):
    stem = next(p.name[:-5] for p in quick_run.iterdir() if p.name.endswith(".json"))
    before = json.loads((quick_run / f"{stem}.json").read_text())["results"]
    proc = _run("--device", "cpu", "--quick", "--out", str(quick_run), "--op", "cross_entropy", "--modes", "fwd",
                "--providers", "reference", "--no-memory", "--no-plots")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((quick_run / f"{stem}.json").read_text())["results"]
    assert [r for r in after if r["op"] != "cross_entropy"] == [r for r in before if r["op"] != "cross_entropy"]
    assert {(r["provider"], r["mode"]) for r in after if r["op"] == "cross_entropy"} == {("reference", "fwd")}


@pytest.mark.parametrize("args, flag", [
    (["--device", "tpu"], "--device"), (["--modes", "fwd,sideways"], "--modes"), (["--op", "softmax"], "--op"),
    (["--providers", "nobody", "--op", "cross_entropy"], "--providers"),
])
def test_bad_flags_are_one_line_errors(args, flag, tmp_path):
    proc = _run("--quick", "--no-memory", "--out", str(tmp_path), *args, timeout=300)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_pytest_benchmark_file_runs_every_case_once():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(BENCH)], cwd=ROOT, env=_env() | {"AIMV2_BENCH_QUICK": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_importing_the_harness_leaves_the_value_checks_on():
    """bench/run.py turns the ops' value checks off in its own runs only, not in a process that imports it."""
    assert os.environ.get("AIMV2_CHECK_VALUES") == CHECK_VALUES


def test_make_step_modes_and_bad_mode():
    w = torch.randn(5, requires_grad=True)
    loss = lambda: (w * w).sum()  # noqa: E731
    assert torch.equal(harness.make_step(loss, [w], "fwd")(), loss())
    for mode in ("bwd", "fwd+bwd"):
        w.grad = None
        step = harness.make_step(loss, [w], mode)
        step()
        step()  # grads are reset before each call, not accumulated
        torch.testing.assert_close(w.grad, 2 * w.detach())
    with pytest.raises(ValueError, match="mode"):
        harness.make_step(loss, [w], "sideways")


def test_markdown_speedup_is_against_the_eager_reference():
    rows = [harness.Result("op", "c", "reference", "fwd", 4.0, 3.0, 5.0),
            harness.Result("op", "c", "cpu", "fwd", 1.0, 0.9, 1.1, derived={"GB/s": 12.5}),
            harness.Result("op", "c", "peer", "fwd", error="peer: not installed")]
    md = harness.to_markdown(rows, {"device_name": "x", "device": "cpu", "date": "d"}, "T", {"op": ["a note"]})
    line = next(line for line in md.splitlines() if "| cpu |" in line)
    assert "| 4.00 |" in line and "| 12.5 |" in line
    assert "peer: not installed" in md and "- a note" in md


def test_time_fn_percentiles_on_cpu():
    med, p20, p80 = harness.time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), torch.device("cpu"),
                                    rep_ms=5, min_runs=7)
    assert 0 < p20 <= med <= p80
