"""bench/gpu_check.sh's usage and its summary page (bench/gpu_summary.py); `make test` dry-runs the script itself."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
summary = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(summary)


def _detail(tmp_path: Path) -> tuple[Path, Path]:
    detail = tmp_path / "detail"
    (detail / "train").mkdir(parents=True)
    stages = tmp_path / "stages.tsv"
    stages.write_text("stage\texit\tseconds\tcap\nbuild\t0\t80\t150\ntriton\t1\t41\t60\nbench\t124\t140\t140\n")
    (detail / "env.txt").write_text("NVIDIA H200, 580.159.04\ntorch 2.11.0+cu130\n")
    (detail / "triton.log").write_text(
        "Triton autotuning for function _attn_fwd_kernel,\nwith key as (256, 128),\nfinished after 3.25s,\n"
        "best config selected: BLOCK_M: 128;\n..F\nFAILED tests/test_triton_attention.py::test_fwd[bf16] - assert\n")
    (detail / "bench.log").write_text("finished after 1.50s,\nfinished after 0.25s,\n")
    (detail / "bench_summary.md").write_text(
        "# at a glance\n\n| op | ours |\n|---|---|\n| prefix_attention | triton |\n")
    (detail / "train" / "train_throughput-cuda-2026-12-02.md").write_text(
        "| backend | MFU |\n|---|---|\n| triton | 0.41 |\n")
    return stages, detail


def test_stage_table_names_failures_and_caps(tmp_path):
    stages, _ = _detail(tmp_path)
    table = summary.stage_table(summary.read_stages(stages))
    assert table[2] == "| build | 0 | 80 | 150 | ok |"
    assert table[3].endswith("| FAILED |") and table[4].endswith("| CAP HIT |")


def test_autotuning_seconds_are_summed_per_stage(tmp_path):
    stages, detail = _detail(tmp_path)
    rows = summary.autotune_seconds(detail, summary.read_stages(stages))
    assert "| triton | 1 | 3.2 |" in rows or "| triton | 1 | 3.3 |" in rows
    assert "| bench | 2 | 1.8 |" in rows
    assert rows[-1] == "| all | 3 | 5.0 |"


def test_summary_page(tmp_path, capsys):
    stages, detail = _detail(tmp_path)
    assert summary.main(["--stages", str(stages), "--detail", str(detail), "--total", "301"]) == 0
    page = capsys.readouterr().out
    assert page.startswith("# gpu_check: GPU run")
    assert "Wall time of the whole check: 301 s." in page
    assert "FAILED tests/test_triton_attention.py::test_fwd[bf16]" in page
    assert "| prefix_attention | triton |" in page and "| triton | 0.41 |" in page
    assert "estimate" not in page  # only the dry run estimates


def test_autotune_plan_counts_the_real_runs_shapes():
    capped, full = summary.autotune_plan(2), summary.autotune_plan(None)
    assert capped["tunings"] == full["tunings"] > 10  # 3 attention kernels per shape, among others
    assert capped["configs_each"] == 2 and capped["compiles"] < full["compiles"]
    assert capped["seconds"] == pytest.approx(capped["compiles"] * summary.COMPILE_S
                                              + capped["tunings"] * 2 * summary.BENCH_S)


def test_gpu_check_needs_an_outdir():
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert run.returncode != 0 and "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" in run.stderr


def test_gpu_check_syntax():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "compat.sh")]).returncode == 0
