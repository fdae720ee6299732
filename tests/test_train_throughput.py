"""bench/train_throughput.py and bench/train_profile.py: the model FLOP count, the backend selection, the
throughput run, the profile (``--profile``) and the flag checks (aimv2-tiny on the CPU; no timing assertions)."""
import gzip
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aimv2 import AIMv2, AIMv2Config
from aimv2_kernels._backend import extension_available, triton_available

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
tt = importlib.util.module_from_spec(SPEC)
sys.modules["train_throughput"] = tt
SPEC.loader.exec_module(tt)
import train_profile  # noqa: E402  (bench/ is on sys.path once train_throughput is loaded)

CPU = torch.device("cpu")
KERNEL_BACKENDS = ["cpu"] if extension_available() else []
needs_extension = pytest.mark.skipif(not extension_available(), reason="aimv2_kernels._C is not built")


def test_flops_match_flop_counter_on_the_reference():
    """FlopCounterMode counts every matmul the reference runs in a forward + backward: the same matmuls as
    model_flops_per_step, so the counts agree exactly when attention is counted as the reference computes it
    (dense scores, then a mask). The default count leaves out the masked-out attention pairs: it is smaller by
    exactly their FLOPs (x3 for the backward)."""
    cfg = AIMv2Config.from_name("aimv2-tiny", backend="reference")
    model = AIMv2(cfg)
    b, n, s = 3, cfg.encoder.num_patches, cfg.encoder.num_patches + 1 + cfg.decoder.context_length
    images = torch.randn(b, 3, cfg.encoder.image_size, cfg.encoder.image_size)
    tokens = torch.randint(2, cfg.decoder.vocab_size, (b, cfg.decoder.context_length))
    prefix_lens = torch.tensor([1, 7, n - 1])
    with FlopCounterMode(display=False) as counter:
        model(images, tokens, prefix_lens).loss.backward()
    counted = counter.get_total_flops()
    assert counted == tt.model_flops_per_step(cfg, b, prefix_lens, attention="dense")

    visible = tt.model_flops_per_step(cfg, b, prefix_lens)
    enc, dec = cfg.encoder, cfg.decoder
    masked_enc = enc.depth * 2 * enc.dim * sum(n * n - m * m for m in prefix_lens.tolist())
    masked_dec = dec.depth * 2 * b * s * s * dec.dim
    assert counted - visible == pytest.approx(3 * (masked_enc + masked_dec), rel=1e-12)


def test_expected_prefix_is_the_mean_over_the_draws():
    cfg = AIMv2Config.from_name("aimv2-demo")
    n = cfg.encoder.num_patches
    mean = sum(tt.model_flops_per_step(cfg, 1, [m]) for m in range(1, n)) / (n - 1)
    assert tt.model_flops_per_step(cfg, 4) == pytest.approx(4 * mean, rel=1e-12)


def test_flops_argument_errors():
    cfg = AIMv2Config.from_name("aimv2-tiny")
    with pytest.raises(ValueError, match="prefix_lens"):
        tt.model_flops_per_step(cfg, 2, [1])
    with pytest.raises(ValueError, match="prefix_lens"):
        tt.model_flops_per_step(cfg, 1, [cfg.encoder.num_patches + 1])
    with pytest.raises(ValueError, match="attention"):
        tt.model_flops_per_step(cfg, 1, attention="flash")


def test_all_backends_on_cpu_leave_out_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton is then "available" on CPU tensors
    backends, notes = tt.select_backends("all", CPU)
    assert backends == ["reference"] + KERNEL_BACKENDS
    if triton_available():
        assert any(note.startswith("triton: skipped") for note in notes)
    backends, notes = tt.select_backends("triton,reference", CPU)
    assert backends == ["reference"] and any(note.startswith("triton: skipped") for note in notes)


def test_main_writes_a_row_per_backend(tmp_path, capsys):
    backends = ["reference"] + KERNEL_BACKENDS
    check_values = os.environ.get("AIMV2_CHECK_VALUES")
    rc = tt.main(["--preset", "aimv2-tiny", "--device", "cpu", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                  "--modes", "eager", "--backends", ",".join(backends), "--out", str(tmp_path)])
    assert rc == 0
    [json_path] = tmp_path.glob("train_throughput-cpu-*.json")
    md = json_path.with_suffix(".md").read_text()
    data = json.loads(json_path.read_text())
    assert data["preset"] == "aimv2-tiny" and data["batch_size"] == 2 and data["environment"]["device"] == "cpu"
    assert data["flops_per_step"] == pytest.approx(tt.model_flops_per_step(AIMv2Config.from_name("aimv2-tiny"), 2))
    assert [(r["backend"], r["mode"]) for r in data["rows"]] == [(b, "eager") for b in backends]
    for row in data["rows"]:
        assert row["error"] is None, row["error"]
        assert len(row["step_ms"]) == 2 and all(t > 0 for t in row["step_ms"])
        assert row["median_ms"] > 0 and row["images_per_s"] > 0 and row["tflops"] > 0
        assert row["mfu"] is None  # CPU: no MFU
        assert torch.isfinite(torch.tensor(row["loss"]))
        assert f"| {row['backend']} | eager | " in md
    assert "| backend | mode | step ms |" in capsys.readouterr().out
    assert os.environ.get("AIMV2_CHECK_VALUES") == check_values  # turned off while timing only


def test_a_failing_backend_is_an_error_row(tmp_path):
    rc = tt.main(["--preset", "aimv2-tiny", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                  "--modes", "eager", "--backends", "cuda,reference", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert "--backend cuda cannot run" in rows[0]["error"] and rows[0]["median_ms"] is None
    assert rows[1]["error"] is None and rows[1]["median_ms"] > 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_profile_writes_a_trace_and_op_shares(tmp_path, backend):
    rc = tt.main(["--preset", "aimv2-tiny", "--device", "cpu", "--batch-size", "2", "--profile", "--backends", backend,
                  "--steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    trace = tmp_path / f"trace-aimv2-tiny-{backend}-cpu.json"
    assert trace.stat().st_size > 0
    assert json.loads(trace.read_text())["traceEvents"]
    [json_path] = tmp_path.glob(f"train_profile-aimv2-tiny-{backend}-cpu-*.json")
    result = json.loads(json_path.read_text())["profile"]
    assert set(result["ops"]) == set(tt.OPS)
    calls = {"patch_mse_loss": 1, "linear_cross_entropy": 1,
             "prefix_attention": AIMv2Config.from_name("aimv2-tiny").encoder.depth + 1}  # + decoder depth 1
    for op, row in result["ops"].items():
        assert row["calls_per_step"] == calls[op]
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0
        assert 0 <= row["share_pct"] <= 100
        assert (row["custom_ops_ms"] is None) == (backend == "reference")
    assert 0 <= result["ops_share_pct"] <= 100
    md = json_path.with_suffix(".md").read_text()
    assert all(f"| {op} |" in md for op in tt.OPS)


def test_trace_is_gzipped_when_its_path_ends_in_gz(tmp_path):
    """``--profile-out trace.json.gz`` (bench/gpu_check.sh): the Chrome trace is written gzipped, no raw copy."""
    class Prof:
        def export_chrome_trace(self, path):
            Path(path).write_text('{"traceEvents": [1]}')

    trace = tmp_path / "sub" / "trace.json.gz"
    train_profile.write_trace(Prof(), trace)
    assert json.loads(gzip.decompress(trace.read_bytes())) == {"traceEvents": [1]}
    assert sorted(p.name for p in trace.parent.iterdir()) == ["trace.json.gz"]


@pytest.mark.parametrize("argv, flag", [
    (["--preset", "aimv2-nope"], "--preset"),
    (["--backends", "reference,nope"], "--backends"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--modes", "eager,jit"], "--modes"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        tt.parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
