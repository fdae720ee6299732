"""The benchmark harness (bench/): a --quick smoke run of bench/run.py that checks its output files, the
pytest-benchmark file run once per case, bad flags, the harness's pure helpers, the byte and FLOP counts of each
bench module against hand-computed cases, the limits (% of limit, x best peer, the at-a-glance summary and its
goals) on fake results, and bench/limits.py. No timing assertions."""
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
import bench_cross_entropy as ce
import bench_linear_cross_entropy as lce
import bench_patch_mse_loss as pm
import bench_prefix_attention as pa
import harness
import run

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
    # --no-memory: each memory figure costs a fresh subprocess per provider (over a minute in all);
    # test_run_op_measures_memory_in_a_fresh_process covers that path once.
    proc = _run("--device", "cpu", "--quick", "--no-memory", "--out", str(out), "--summary",
                str(out / "glance" / "summary.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plots(quick_run):
    stems = sorted(p.name for p in quick_run.iterdir() if p.is_file())
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
            assert r["peak_mem_mb"] is None, r  # --no-memory
            assert r["derived"] and all(v > 0 for k, v in r["derived"].items() if not k.startswith("extra")), r
            # Bytes and FLOPs of the shape are recorded; a CPU run has no measured ceiling, hence no limit.
            work = module.work(next(c for c in module.configs(torch.device("cpu"), True) if c.name == r["config"]),
                               r["mode"])
            assert (r["bytes"], r["flops"]) == (work["bytes"], work["flops"]) and r["bytes"] > 0, r
            assert r["limit_ms"] is None, r
            assert "extra MB" not in r["derived"], r  # derived from the memory figure
        # The providers that cannot run here are named with the reason.
        not_run = [p for p, why in module.providers(torch.device("cpu")).items() if why is not None]
        assert all(any(line.startswith(f"not run: {p} (") for line in env["notes"][op]) for p in not_run)
        png = quick_run / f"{stem}-{op}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (quick_run / f"{stem}.md").read_text()
    for op in OPS:
        assert f"## {op}" in md
    assert md.count("| reference | ") >= len(OPS) and "x ref" in md
    assert "| x best peer |" in md and "% of limit |" not in md  # no ceilings on a CPU: no limit column
    summary = (quick_run / "glance" / "summary.md").read_text()
    groups = {(r["op"], r["config"], r["mode"]) for r in rows}
    assert sum(line.startswith("| ") and " | " in line for line in summary.splitlines()) >= len(groups)
    for op, config, mode in groups:
        assert f"| {op} | {config} | {mode} | cpu | " in summary
    # Every goal is n.a. on a CPU: in the rows and in the goal table's "met" column.
    assert "| n.a. (GPU goals) |" in summary and ": yes (" not in summary and ": no (" not in summary
    goal_rows = [line.split("|") for line in summary.splitlines() if line.count("|") == 5 and "---" not in line]
    assert len(goal_rows) > 2 and all(cells[3].strip() == "n.a." for cells in goal_rows[1:])


def test_run_op_measures_memory_in_a_fresh_process():
    """run_op with memory on a CPU: one fresh subprocess per provider gives every (config, mode) its peak, and
    linear CE its memory-derived columns."""
    op = "linear_cross_entropy"
    results, notes = run.run_op(op, torch.device("cpu"), True, ["fwd", "fwd+bwd"], ["reference"], True)
    configs = run.OPS[op].configs(torch.device("cpu"), True)
    assert {(r.config, r.mode) for r in results} == {(c.name, m) for c in configs for m in ("fwd", "fwd+bwd")}
    for r in results:
        assert r.error is None and r.peak_mem_mb is not None and r.peak_mem_mb >= 0, r
        assert r.derived["extra MB"] >= 0 and "extra % logits" in r.derived, r
    assert any(n.startswith("peak MB: growth of the peak resident size") for n in notes)


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
    loss = lambda: (w * w).sum()
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


# -- byte and FLOP counts (hand-computed) ---------------------------------------------------------------------

def test_prefix_attention_work_with_known_prefixes(monkeypatch):
    monkeypatch.setattr(pa.Config, "prefix_lens", lambda self, device: torch.tensor([3, 5]))
    c = pa.Config(batch=2, heads=3, seq=8, head_dim=4, dtype=torch.bfloat16)
    # 2 D H sum_b (S^2 + M_b^2) = 2 * 4 * 3 * ((64 + 9) + (64 + 25)) = 3888; backward 2.5x.
    assert pa.work(c, "fwd")["flops"] == 3888
    assert pa.work(c, "bwd")["flops"] == 9720
    assert pa.work(c, "fwd+bwd")["flops"] == 3888 + 9720
    # One of q, k, v, o, do, dq, dk, dv: 2 * 3 * 8 * 4 * 2 bytes = 384; the fp32 lse: 2 * 3 * 8 * 4 = 192.
    assert pa.work(c, "fwd")["bytes"] == 4 * 384 + 192  # read q, k, v; write o, lse
    assert pa.work(c, "bwd")["bytes"] == 8 * 384 + 192  # read q, k, v, o, do, lse; write dq, dk, dv
    assert pa.work(c, "fwd+bwd")["bytes"] == 12 * 384 + 2 * 192
    assert pa.work(c, "fwd")["dtype"] == "bfloat16"
    assert pa.derived(c, "fwd+bwd", 1.0)["TFLOP/s"] == pytest.approx(13608 / 1e9)


def test_prefix_attention_causal_is_half_of_full_and_prefixes_are_seeded():
    causal = pa.Config(batch=3, heads=2, seq=16, head_dim=8, prefix="causal")
    assert pa.work(causal, "fwd")["flops"] == 4 * 3 * 2 * 16 ** 2 * 8 // 2
    c = pa.Config(batch=5, heads=2, seq=64, head_dim=8)
    lens = c.prefix_lens("cpu")
    assert torch.equal(lens, c.prefix_lens("cpu")) and ((lens >= 1) & (lens <= 63)).all()
    assert c.sum_prefix_squares() == int((lens ** 2).sum())
    assert pa.work(c, "fwd")["flops"] == 2 * 8 * 2 * (5 * 64 ** 2 + int((lens ** 2).sum()))


def test_patch_loss_work_is_its_byte_floor():
    c = pm.Config(batch=2, image_size=28, patch=14, dtype=torch.float32)  # 4 patches, 3 predicted
    pred, images = 2 * 3 * 3 * 14 ** 2, 2 * 3 * 28 ** 2  # elements
    assert pm.work(c, "fwd") == {"bytes": (pred + images) * 4, "flops": 0, "dtype": "float32"}
    assert pm.work(c, "fwd+bwd")["bytes"] == (2 * pred + images) * 4  # + grad_pred written
    assert pm.derived(c, "fwd", 2.0)["GB/s"] == pytest.approx((pred + images) * 4 / 2e6)


def test_linear_cross_entropy_work_and_extra_memory():
    c = lce.Config(tokens=1024, dim=256, vocab=2048, dtype=torch.bfloat16)
    assert lce.work(c, "fwd") == {"bytes": (1024 + 2048) * 256 * 2, "flops": 2 * 1024 * 256 * 2048,
                                  "dtype": "bfloat16"}
    assert lce.work(c, "fwd+bwd") == {"bytes": 2 * (1024 + 2048) * 256 * 2, "flops": 6 * 1024 * 256 * 2048,
                                      "dtype": "bfloat16"}
    assert lce.work(c, "bwd")["flops"] == 4 * 1024 * 256 * 2048
    # Logits 1024 x 2048 bf16 = 4 MiB; the gradients of hidden and weight (3072 x 256 bf16) = 1.5 MiB.
    assert c.logits_mb() == 4.0 and c.grads_mb("fwd+bwd") == 1.5 and c.grads_mb("fwd") == 0.0
    assert lce.memory_derived(c, "fwd+bwd", 1.7) == pytest.approx({"extra MB": 0.2, "extra % logits": 5.0})
    assert lce.memory_derived(c, "fwd", 1.7) == pytest.approx({"extra MB": 1.7, "extra % logits": 42.5})
    assert lce.memory_derived(c, "fwd+bwd", 1.0)["extra MB"] == 0.0  # never negative


def test_cross_entropy_work_reads_the_logits_once():
    c = ce.Config(tokens=10, vocab=100, dtype=torch.bfloat16)
    assert ce.work(c, "fwd") == {"bytes": 2000, "flops": 0, "dtype": "bfloat16"}
    assert ce.work(c, "fwd+bwd")["bytes"] == ce.work(c, "bwd")["bytes"] == 4000


def test_every_module_counts_every_cuda_shape():
    for module in run.OPS.values():
        for c in module.configs(torch.device("cuda"), quick=False):
            assert c.dtype == torch.bfloat16, c.name
            for mode in harness.MODES:
                w = module.work(c, mode)
                assert isinstance(w["bytes"], int) and isinstance(w["flops"], int) and w["bytes"] > 0
            assert module.work(c, "fwd+bwd")["bytes"] > module.work(c, "fwd")["bytes"]


def test_cuda_attention_shapes_hold_the_goal_lengths():
    shapes = {(c.seq, c.head_dim, c.dtype, c.prefix) for c in pa.configs(torch.device("cuda"))}
    for s in (256, 1024, 4096):
        assert (s, 128, torch.bfloat16, "random") in shapes


# -- limits, % of limit, x best peer ------------------------------------------------------------------------

CEILINGS = {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 100.0}


def test_limit_is_the_larger_of_the_copy_and_matmul_times():
    # 2e9 bytes at 1000 GB/s: 2 ms; 1e12 FLOPs at 100 TFLOP/s: 10 ms.
    assert harness.limit_ms({"bytes": 2e9, "flops": 0, "dtype": "bfloat16"}, CEILINGS) == pytest.approx(2.0)
    assert harness.limit_ms({"bytes": 2e9, "flops": 10 ** 12, "dtype": "bfloat16"}, CEILINGS) == pytest.approx(10)
    assert harness.limit_ms({"bytes": 2e10, "flops": 10 ** 12, "dtype": "bfloat16"}, CEILINGS) == pytest.approx(20)
    # FLOPs in a dtype whose matmul rate was not measured: no limit rather than a wrong one.
    assert harness.limit_ms({"bytes": 2e9, "flops": 10 ** 12, "dtype": "float32"}, CEILINGS) is None
    assert harness.limit_ms({"bytes": 2e9, "flops": 0, "dtype": "float32"}, CEILINGS) == pytest.approx(2.0)
    assert harness.limit_ms({"bytes": 2e9, "flops": 0, "dtype": "bfloat16"}, {}) is None  # a CPU run


def _fake_rows():
    rows = [harness.Result("prefix_attention", "c", "reference", "fwd", 4.0, 3.9, 4.1),
            harness.Result("prefix_attention", "c", "reference-compiled", "fwd", 0.5, 0.4, 0.6),
            harness.Result("prefix_attention", "c", "cuda", "fwd", 1.0, 0.9, 1.1, limit_ms=0.5,
                           derived={"TFLOP/s": 400.0}),
            harness.Result("prefix_attention", "c", "flex-attention", "fwd", 2.0, 1.9, 2.1, limit_ms=0.5),
            harness.Result("prefix_attention", "c", "sdpa-dense-mask", "fwd", 3.0, 2.9, 3.1, limit_ms=0.5),
            harness.Result("prefix_attention", "c", "flash-attn", "fwd", error="flash-attn is not installed")]
    return rows


def _cells(md: str, provider: str) -> dict[str, str]:
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| config |"))
    row = next(line for line in lines if f"| {provider} |" in line)
    return dict(zip([h.strip() for h in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))


def test_markdown_pct_of_limit_and_x_best_peer():
    env = {"device_name": "H", "device": "cuda", "date": "d", "ceilings": CEILINGS}
    md = harness.to_markdown(_fake_rows(), env, "T")
    ours = _cells(md, "cuda")
    # The fastest peer is FlexAttention (2 ms); the compiled reference is faster still but a baseline, not a peer.
    assert ours["x ref"] == "4.00" and ours["x best peer"] == "2.00" and ours["% of limit"] == "50.0"
    assert _cells(md, "reference")["x best peer"] == "0.50" and _cells(md, "reference")["% of limit"] == ""
    assert _cells(md, "flex-attention")["x best peer"] == "1.00"
    assert _cells(md, "sdpa-dense-mask")["% of limit"] == "16.7"
    assert "1000 GB/s" in md and "100 TFLOP/s" in md


def test_markdown_without_ceilings_has_no_limit_column():
    rows = [harness.Result(r.op, r.config, r.provider, r.mode, r.median_ms, r.p20_ms, r.p80_ms, derived=r.derived,
                           error=r.error) for r in _fake_rows()]
    md = harness.to_markdown(rows, {"device_name": "x", "device": "cpu", "date": "d"}, "T")
    assert "% of limit" not in md.split("## prefix_attention")[1]
    ours = _cells(md, "cuda")
    assert ours["x best peer"] == "2.00" and ours["TFLOP/s"] == "400"
    header = next(line for line in md.splitlines() if line.startswith("| config |"))
    body = [line for line in md.splitlines() if line.startswith("| c |")]
    assert len(body) == 6 and all(line.count("|") == header.count("|") for line in body)  # every row complete


def test_is_peer():
    assert all(harness.is_peer(p) for p in ("flex-attention", "sdpa-dense-mask", "flash-attn", "liger",
                                            "cut-cross-entropy", "cce-torch_compile", "apex-xentropy"))
    assert not any(harness.is_peer(p) for p in ("reference", "reference-compiled", "cpu", "triton", "cuda"))


# -- the at-a-glance summary and its goals ------------------------------------------------------------------

CUDA = torch.device("cuda")
H200 = {"copy_GBps": 1000.0, "bf16_matmul_TFLOPs": 790.0}


def _cfg(module, pred):
    return next(c for c in module.configs(CUDA) if pred(c))


def _goal_results():
    patch = _cfg(pm, lambda c: c.image_size == 224)
    attn = _cfg(pa, lambda c: c.seq == 4096)
    lin = _cfg(lce, lambda c: c.tokens == 128 * 77)
    R = harness.Result
    out = [
        # patch: 115.3 MB at 1000 GB/s = 0.1153 ms; ours 0.13 ms = 88.7% (yes), 1.38x compiled (no).
        R(pm.OP, patch.name, "reference", "fwd+bwd", 0.5, 0.5, 0.5),
        R(pm.OP, patch.name, "reference-compiled", "fwd+bwd", 0.18, 0.18, 0.18),
        R(pm.OP, patch.name, "triton", "fwd+bwd", 0.2, 0.2, 0.2),
        R(pm.OP, patch.name, "cuda", "fwd+bwd", 0.13, 0.13, 0.13),
        # attention S=4096 fwd: 414.6 GFLOP in 1.0 ms = 415 TFLOP/s (yes); FlexAttention 1.2 ms = 1.2x (no).
        R(pa.OP, attn.name, "triton", "fwd", 1.0, 1.0, 1.0),
        R(pa.OP, attn.name, "flex-attention", "fwd", 1.2, 1.2, 1.2),
        # linear CE N=9856 fwd+bwd: 1937.8 GFLOP in 4 ms = 484 TFLOP/s = 61% of 790 (yes); cce 3.9 ms (no).
        R(lce.OP, lin.name, "triton", "fwd+bwd", 4.0, 4.0, 4.0, peak_mem_mb=100.0,
          derived=lce.memory_derived(lin, "fwd+bwd", 100.0)),
        R(lce.OP, lin.name, "cut-cross-entropy", "fwd+bwd", 3.9, 3.9, 3.9),
        # A shape where our backend failed meets none of its goals.
        R(lce.OP, lin.name, "triton", "fwd", error="RuntimeError: boom"),
    ]
    for r in out:
        module = run.OPS[r.op]
        config = next(c for c in module.configs(CUDA) if c.name == r.config)
        r.limit_ms = harness.limit_ms(module.work(config, r.mode), H200)
    return out


def _summary(tmp_path, env_device="cuda", train=None):
    env = {"device_name": "H200", "device": env_device, "date": "d", "torch": "t", "ceilings": H200}
    json_path, _ = harness.write(_goal_results(), env, tmp_path, "fake", "T")
    train_json = tmp_path / "train.json"
    if train is not None:
        train_json.write_text(json.dumps(train))
    return run.write_summary(tmp_path / "summary.md", json_path, CUDA, False, train_json).read_text()


def _goal(text: str, op: str, name: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(f"| {op} | {name} |"))
    return line.split("|")[3].strip()


def test_summary_rows_and_goals_on_fake_gpu_results(tmp_path):
    text = _summary(tmp_path)
    patch_row = next(line for line in text.splitlines() if line.startswith("| patch_mse_loss |"))
    assert "| cuda | 0.13 | 3.85 |" in patch_row and "| 88.7 |" in patch_row  # fastest of ours: cuda
    assert _goal(text, "patch_mse_loss", ">= 80% of copy bandwidth") == "yes"
    assert _goal(text, "patch_mse_loss", ">= 1.5x reference-compiled") == "no"
    assert _goal(text, "prefix_attention", ">= 400 TFLOP/s forward") == "yes"
    assert _goal(text, "prefix_attention", ">= 1.3x FlexAttention") == "no"
    attn_row = next(line for line in text.splitlines() if line.startswith("| prefix_attention |"))
    assert "| 1.20 (flex-attention) |" in attn_row  # x best peer: FlexAttention 1.2 ms over ours 1.0 ms
    # fwd+bwd met the rate (61%) and the memory goal (18.3 MB over the gradients, 3.0% of 601.5 MB of logits);
    # the failed fwd row meets neither.
    assert _goal(text, "linear_cross_entropy", ">= 55% of matmul rate") == "no"
    assert "1 of 2 rows met" in next(line for line in text.splitlines()
                                     if line.startswith("| linear_cross_entropy | >= 55% of matmul rate |"))
    assert _goal(text, "linear_cross_entropy", ">= 1.0x cut-cross-entropy") == "no"
    assert _goal(text, "linear_cross_entropy", ">= 1.0x liger") == "no"  # ours failed at fwd; n.a. at fwd+bwd
    lin_row = next(line for line in text.splitlines() if line.startswith("| linear_cross_entropy |")
                   and "| fwd+bwd |" in line)
    assert "extra memory <= 5% of logits: yes (3.0%)" in lin_row and ">= 1.0x liger: n.a." in lin_row
    assert _goal(text, "training step", run.TRAIN_GOAL) == "n.a."


def test_summary_training_goal_from_the_throughput_json(tmp_path):
    train = {"preset": "aimv2-large-patch14-224", "batch_size": 128,
             "rows": [{"backend": "reference", "mode": "eager", "mfu": 0.6},
                      {"backend": "auto", "mode": "eager", "mfu": 0.47}]}
    assert _goal(_summary(tmp_path, train=train), "training step", run.TRAIN_GOAL) == "yes"
    train["rows"][1]["mfu"] = 0.40  # the reference's MFU does not count
    assert _goal(_summary(tmp_path, train=train), "training step", run.TRAIN_GOAL) == "no"
    train["batch_size"] = 32
    assert _goal(_summary(tmp_path, train=train), "training step", run.TRAIN_GOAL) == "n.a."


def test_summary_goals_are_na_off_the_gpu(tmp_path):
    text = _summary(tmp_path, env_device="cpu")
    goals = [line for line in text.splitlines() if line.count("|") == 5 and not line.startswith("|---")][1:]
    assert goals and all(line.split("|")[3].strip() == "n.a." for line in goals)


# -- bench/limits.py --------------------------------------------------------------------------------------------

def _limits(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / "limits.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_limits_prints_every_cuda_shape_and_mode():
    md = _limits("--markdown")
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| op |")]
    expected = {(op, c.name, mode) for op, m in run.OPS.items() for c in m.configs(CUDA) for mode in ("fwd", "fwd+bwd")}
    got = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in table}
    assert got == expected and len(table) == len(expected)
    # S=4096 forward: 414.6 GFLOP at 790 TFLOP/s = 0.5249 ms (matmul-bound).
    s4096 = next(line for line in table if "S=4096" in line and "| fwd |" in line)
    assert "| 0.5249 | matmul |" in s4096
    assert "Training step: aimv2-large-patch14-224, batch 128" in md and "45% MFU" in md


def test_limits_follow_the_given_figures():
    slow = _limits("--copy-GBps", "2150", "--matmul-TFLOPs", "395")
    row = next(line for line in slow.splitlines() if line.startswith("patch_mse_loss") and "224px" in line
               and " fwd+bwd " in line)
    assert row.split()[-2] == "0.0536"  # 115.3 MB at 2150 GB/s; 0.0268 ms at the default 4300
    assert "matmul 395 TFLOP/s" in slow
    bad = subprocess.run([sys.executable, str(BENCH / "limits.py"), "--copy-GBps", "0"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--copy-GBps" in bad.stderr
