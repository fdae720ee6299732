"""aimv2.metrics: the JSONL record, TensorBoard event files read back with TensorBoard's own reader (purge on
resume included), Weights & Biases through a fake ``wandb`` module (no network, no account), and a failing sink that
is switched off while the record goes on."""
import json
import math
import socket
import sys
import types

import pytest

from aimv2 import metrics
from aimv2.metrics import TAGS, MetricsLogger, read_metrics, scalars

# A row as the trainer sends it (aimv2/train.py): floats, ints, None off the GPU, a bool on a skipped update.
ROW = {"step": 10, "loss": 2.5, "loss_img": 0.75, "loss_txt": 2.2, "lr": 1e-4, "grad_norm": 1.25, "images": 8,
       "patches": 256, "bad_steps": 0, "images_per_s": 123.5, "step_time_s": 0.0625, "tokens_per_s": 9000.0,
       "mfu": None, "peak_mem_gib": None, "skipped_samples": 1, "micro_batches": 2}


def row(step: int, **extra) -> dict:
    return {**ROW, "step": step, "loss": 10.0 / step, "lr": step * 1e-5, **extra}


def jsonl(out) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


# -- the JSONL record -----------------------------------------------------------------------------------------

def test_jsonl_is_one_json_dumps_line_per_row(tmp_path):
    rows = [row(1), row(2, skipped_update=True, loss=math.nan, grad_norm=math.inf), row(3, note="text")]
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for r in rows:
            log.log(r)
            assert jsonl(tmp_path)[-1] == json.dumps(r)  # flushed at once
    assert jsonl(tmp_path) == [json.dumps(r) for r in rows]
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert back[1]["skipped_update"] is True and math.isnan(back[1]["loss"]) and back[1]["mfu"] is None
    assert [r["step"] for r in back] == [1, 2, 3] and back[2]["note"] == "text"


def test_a_logger_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row(1)) + "\n")
    with MetricsLogger(tmp_path, tensorboard=False, start_step=1) as log:
        log.log(row(2))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_read_metrics_skips_a_cut_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(row(1)) + "\n\n" + json.dumps(row(2)) + "\n" + json.dumps(row(3))[:17])
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text(json.dumps(row(1)) + "\n" + '{"step": 2, "lo\n' + json.dumps(row(3)) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    path.write_text("")
    assert read_metrics(path) == []


def test_a_jsonl_write_error_propagates(tmp_path):
    class FullDisk:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    log = MetricsLogger(tmp_path, tensorboard=False)
    log._file = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        log.log(row(1))
    log.close()


def test_bad_rows_and_a_closed_logger(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for bad in ({"loss": 1.0}, {"step": "3"}, {"step": True}, [("step", 1)]):
        with pytest.raises(ValueError, match="step"):
            log.log(bad)
    with pytest.raises(TypeError):
        log.log({"step": 1, "value": object()})  # not JSON: nothing written
    assert jsonl(tmp_path) == []
    log.close()
    log.close()  # twice: nothing
    with pytest.raises(ValueError, match="closed"):
        log.log(row(1))
    with pytest.raises(ValueError, match="start_step"):
        MetricsLogger(tmp_path, tensorboard=False, start_step=-1)


def test_tags_group_every_trainer_key():
    values = scalars(row(10, skipped_update=True, extra_metric=7))
    assert values == {
        "loss/total": 1.0, "loss/image": 0.75, "loss/text": 2.2, "optim/lr": 1e-4, "optim/grad_norm": 1.25,
        "optim/bad_steps": 0.0, "optim/micro_batches": 2.0, "perf/images_per_s": 123.5, "perf/step_time_s": 0.0625,
        "perf/tokens_per_s": 9000.0, "data/images": 8.0, "data/patches": 256.0, "data/skipped_samples": 1.0,
        "train/extra_metric": 7.0}  # no step, no None (mfu, peak_mem_gib), no bool (skipped_update)
    assert set(ROW) - {"step"} <= set(TAGS)
    assert scalars({"step": 1, "mfu": 0.41, "peak_mem_gib": 71.5}) == {"perf/mfu": 0.41, "perf/peak_mem_gib": 71.5}


# -- TensorBoard ----------------------------------------------------------------------------------------------

def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run folder, as TensorBoard's reader shows it: tag -> [(step, value)]."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard")
    rows = [row(s, mfu=0.25 + s / 100) for s in (5, 10, 15)]
    rows[1].update(loss=math.inf, skipped_update=True)
    with MetricsLogger(tmp_path) as log:  # tensorboard=None: on, since the package is installed
        for r in rows:
            log.log(r)
        events = read_events(tmp_path)  # flushed at every log, readable while the run goes on
    assert set(events) == set(scalars(rows[0]))
    for tag in events:
        key = next(k for k, t in TAGS.items() if t == tag)
        assert [s for s, _ in events[tag]] == [5, 10, 15]
        assert [v for _, v in events[tag]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)  # float32
    assert events["loss/total"][1][1] == math.inf


def test_tensorboard_purges_the_steps_after_the_checkpoint_on_resume(tmp_path):
    """Steps 1..10, then a resume from the checkpoint at step 5 logging 6..8: TensorBoard's reader shows 1..5 of
    the first attempt and 6..8 of the second, each once; 9 and 10 of the first attempt are gone."""
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path) as log:
        for s in range(1, 11):
            log.log({"step": s, "loss": float(s)})
    with MetricsLogger(tmp_path, start_step=5) as log:
        for s in range(6, 9):
            log.log({"step": s, "loss": 100.0 + s})
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert read_events(tmp_path)["loss/total"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0),
                                                    (6, 106.0), (7, 107.0), (8, 108.0)]


def test_tensorboard_off_writes_no_event_files(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(row(1))
    assert not (tmp_path / "tensorboard").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_tensorboard_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)
    with MetricsLogger(tmp_path) as log:  # None: quietly off
        log.log(row(1))
    assert not (tmp_path / "tensorboard").exists() and capsys.readouterr().err == ""
    assert len(jsonl(tmp_path)) == 1


# -- Weights & Biases (a fake module) -------------------------------------------------------------------------

class FakeRun:
    def __init__(self, fail_at: int | None = None):
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0
        self.fail_at = fail_at

    def log(self, data, step=None):
        if step == self.fail_at:
            raise ConnectionError("W&B service went away")
        self.logged.append((dict(data), step))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    """A ``wandb`` module recording ``init``'s arguments and returning :class:`FakeRun` s."""
    module = types.ModuleType("wandb")
    module.inits, module.runs, module.fail_at, module.init_error = [], [], None, None

    def init(**kwargs):
        if module.init_error is not None:
            raise module.init_error
        module.inits.append(kwargs)
        module.runs.append(FakeRun(module.fail_at))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    return module


def test_wandb_init_log_finish_and_resume(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = {"train": {"steps": 20}, "model": {"name": "aimv2-tiny"}}
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, run_config=config, wandb_name="first") as log:
        log.log(row(1))
        log.log(row(2, skipped_update=True))
    [init] = fake_wandb.inits
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert init == {"project": "aimv2", "name": "first", "dir": str(tmp_path), "config": config, "mode": "disabled",
                    "id": run_id, "resume": "allow"}
    [run] = fake_wandb.runs
    assert run.logged == [(scalars(row(1)), 1), (scalars(row(2)), 2)] and run.finished == 1

    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="mine", start_step=2) as log:
        log.log(row(3))
    assert fake_wandb.inits[1]["id"] == run_id and fake_wandb.inits[1]["project"] == "mine"  # the same W&B run
    assert fake_wandb.runs[1].logged == [(scalars(row(3)), 3)]
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True):  # a new run (step 0): a new id
        pass
    assert fake_wandb.inits[2]["id"] != run_id == fake_wandb.inits[1]["id"]
    assert (tmp_path / "wandb_id.txt").read_text().strip() == fake_wandb.inits[2]["id"]


def test_wandb_goes_offline_when_its_host_does_not_answer(tmp_path, fake_wandb, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    calls = []

    def refuse(address, timeout=None):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    MetricsLogger(tmp_path, tensorboard=False, wandb=True).close()
    assert fake_wandb.inits[-1]["mode"] == "offline"
    assert calls == [(("api.wandb.ai", 443), 2.0)]
    [line] = capsys.readouterr().err.splitlines()
    assert "offline" in line and "wandb sync" in line and str(tmp_path) in line

    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: calls.append(address)
                        or Connection())
    MetricsLogger(tmp_path, tensorboard=False, wandb=True).close()
    assert fake_wandb.inits[-1]["mode"] == "online" and calls[-1] == ("localhost", 8080)
    assert capsys.readouterr().err == ""
    for url, address in (("https://wandb.example.com", ("wandb.example.com", 443)), ("w.example:9000",
                                                                                      ("w.example", 9000))):
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert metrics.wandb_host() == address


def test_wandb_missing_or_failing_to_start(tmp_path, fake_wandb, monkeypatch):
    fake_wandb.init_error = RuntimeError("api_key not configured (no-tty)")
    with pytest.raises(RuntimeError, match="wandb login"):
        MetricsLogger(tmp_path, wandb=True)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, tensorboard=False, wandb=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_failing_wandb_is_switched_off_once(tmp_path, fake_wandb, capsys):
    fake_wandb.fail_at = 2
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True) as log:
        for s in range(1, 5):
            log.log(row(s))
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: W&B logging failed at step 2 (ConnectionError: W&B service went away)")
    [run] = fake_wandb.runs
    assert [step for _, step in run.logged] == [1] and run.finished == 1
    assert len(jsonl(tmp_path)) == 4


def test_a_failing_sink_is_switched_off_and_the_record_goes_on(tmp_path, fake_wandb, capsys):
    pytest.importorskip("tensorboard")
    fake_wandb.fail_at = 3
    with MetricsLogger(tmp_path, wandb=True) as log:
        writer = log._writer

        def broken(tag, value, global_step=None):
            raise OSError(5, "Input/output error")

        log.log(row(1))
        writer.add_scalar = broken
        for s in range(2, 7):
            log.log(row(s))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err  # one warning per sink, once
    assert "TensorBoard logging failed at step 2" in err[0] and "metrics.jsonl" in err[0]
    assert "W&B logging failed at step 3" in err[1] and "ConnectionError" in err[1]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    [run] = fake_wandb.runs
    assert [step for _, step in run.logged] == [1, 2] and run.finished == 1
    assert read_events(tmp_path)["loss/total"] == [(1, pytest.approx(10.0))]
