"""The training metrics: ``OUT/metrics.jsonl`` (the record), and TensorBoard and Weights & Biases to watch them.

:class:`MetricsLogger` receives one row per logged step (``{"step": 100, "loss": 2.3, ...}``) on rank 0. The
JSONL file is the record: every row, as is, one ``json.dumps`` line, flushed; its write errors propagate. TensorBoard
(``OUT/tensorboard``) and W&B get the row's numeric values under grouped tags (:data:`TAGS`); a sink that fails
during a run is switched off with one warning on stderr, and the run and its JSONL record go on.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import numbers
import os
import secrets
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_HOST = "https://api.wandb.ai"
CONNECT_TIMEOUT_S = 2.0

# Row key -> TensorBoard / W&B tag. The prefix groups the charts: losses, optimisation, throughput, data.
TAGS: dict[str, str] = {
    "loss": "loss/total",  # L_text + img_loss_weight * L_img
    "loss_img": "loss/image",  # pixel MSE
    "loss_txt": "loss/text",  # caption cross-entropy
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",  # before clipping
    "bad_steps": "optim/bad_steps",  # steps so far whose non-finite loss or gradient skipped the update
    "micro_batches": "optim/micro_batches",  # gradient-accumulation micro-batches per step
    "images_per_s": "perf/images_per_s",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time_s": "perf/step_time_s",
    "mfu": "perf/mfu",  # a fraction of the device's peak (aimv2.flops.mfu)
    "peak_mem_gib": "perf/peak_mem_gib",
    "images": "data/images",  # images in the step (all ranks)
    "patches": "data/patches",  # patches per image
    "skipped_samples": "data/skipped_samples",  # unreadable samples replaced by others so far
}


def tag_for(key: str) -> str:
    """The TensorBoard / W&B tag of a row key: :data:`TAGS`, else ``"train/<key>"``."""
    return TAGS.get(key, f"train/{key}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's scalars by tag: every int or float value (finite or not) but ``"step"``; bools, None, strings
    and other values are left out."""
    return {tag_for(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, in order. Blank lines are skipped, and so is a last line cut short (a run
    killed in the middle of a write); a bad line before the last one is a ValueError naming the file and line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i + 1}: not a JSON object")
        rows.append(row)
    return rows


def _import_tensorboard(required: bool) -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or None (``required`` False) when tensorboard is not installed;
    an ImportError saying how to install it when ``required``."""
    if not required and importlib.util.find_spec("tensorboard") is None:
        return None
    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard may be imported (cached) already
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if required:
            raise ImportError(f"TensorBoard logging needs the tensorboard package: pip install tensorboard "
                              f"({type(exc).__name__}: {exc})") from exc
        _warn(f"TensorBoard logging is off: tensorboard is installed but does not import "
              f"({type(exc).__name__}: {exc})")
        return None
    return SummaryWriter


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def wandb_host() -> tuple[str, int]:
    """``(host, port)`` of the W&B server: ``WANDB_BASE_URL`` when set, else api.wandb.ai:443."""
    url = os.environ.get("WANDB_BASE_URL") or WANDB_HOST
    parts = urlsplit(url if "://" in url else f"https://{url}")
    host = parts.hostname or "api.wandb.ai"
    try:
        port = parts.port
    except ValueError:
        port = None
    return host, port or (80 if parts.scheme == "http" else 443)


def wandb_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the W&B server (:func:`wandb_host`) opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(wandb_host(), timeout=timeout):
            return True
    except OSError:
        return False


def _wandb_run_id(out: Path, resume: bool) -> str:
    """The W&B run id: the one in ``OUT/wandb_id.txt`` when resuming, else a new one, written there."""
    path = out / WANDB_ID_FILE
    if resume and path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
    path.write_text(run_id + "\n")
    return run_id


class MetricsLogger:
    """Writes each logged step to ``OUT/metrics.jsonl`` and, when enabled, TensorBoard and Weights & Biases.

    Args:
        out: the run folder (created if missing).
        tensorboard: None (the default): log to ``OUT/tensorboard`` when the tensorboard package is installed;
            True: required (an ImportError saying ``pip install tensorboard`` when missing); False: off.
        wandb: log to Weights & Biases (an ImportError saying ``pip install wandb`` when missing). The mode is
            ``WANDB_MODE`` when set, else ``"online"`` when the W&B server answers a TCP connect within 2 s
            (``WANDB_BASE_URL`` or api.wandb.ai:443) and ``"offline"`` otherwise, with one stderr line saying how
            to upload the run later (``wandb sync``).
        wandb_project: the W&B project (default ``"aimv2"``).
        wandb_name: the W&B run name (default: W&B's own).
        run_config: the run's configuration, recorded by W&B.
        start_step: the step the run resumes from (its checkpoint's, whose row the JSONL keeps); 0 for a new run.
            On resume, TensorBoard hides the events of steps after it that an earlier attempt wrote (the
            writer's ``purge_step`` is ``start_step + 1``: the first step this run logs; TensorBoard's faster data
            server also drops, per tag, the points after a step that comes again), and W&B continues the
            run whose id ``OUT/wandb_id.txt`` holds. W&B keeps the steps it already has: it ignores rows whose
            step is not above the last one it recorded (W&B steps only increase). A new run (0) gets a new id.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, out: Path, *, tensorboard: bool | None = None, wandb: bool = False,
                 wandb_project: str | None = None, wandb_name: str | None = None,
                 run_config: dict | None = None, start_step: int = 0) -> None:
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / METRICS_FILE
        self._writer: Any = None  # TensorBoard's SummaryWriter
        self._wandb: Any = None  # the W&B run
        self._file: Any = None
        self._closed = False
        try:
            summary_writer = _import_tensorboard(bool(tensorboard)) if tensorboard is not False else None
            wandb_module = self._import_wandb() if wandb else None
            if summary_writer is not None:
                self._writer = summary_writer(log_dir=str(self.out / TENSORBOARD_DIR),
                                              purge_step=start_step + 1 if start_step else None)
            if wandb_module is not None:
                self._wandb = self._init_wandb(wandb_module, wandb_project, wandb_name, run_config, start_step)
            self._file = open(self.path, "a")
        except BaseException:
            self.close()
            raise

    # -- the sinks ----------------------------------------------------------------------------------------------
    @staticmethod
    def _import_wandb() -> Any:
        try:
            return importlib.import_module("wandb")
        except ImportError as exc:
            raise ImportError(f"W&B logging needs the wandb package: pip install wandb "
                              f"({type(exc).__name__}: {exc})") from exc

    def _init_wandb(self, wandb: Any, project: str | None, name: str | None, config: dict | None,
                    start_step: int) -> Any:
        mode = os.environ.get("WANDB_MODE")
        if not mode:
            mode = "online" if wandb_reachable() else "offline"
            if mode == "offline":
                host, port = wandb_host()
                print(f"W&B: {host}:{port} is not reachable; logging offline into {self.out / 'wandb'}; upload the "
                      f"run later with: wandb sync {self.out / 'wandb'}/offline-run-*", file=sys.stderr, flush=True)
        run_id = _wandb_run_id(self.out, resume=start_step > 0)
        try:
            return wandb.init(project=project or "aimv2", name=name, dir=str(self.out), config=config, mode=mode,
                              id=run_id, resume="allow")
        except Exception as exc:
            raise RuntimeError(f"W&B: wandb.init failed ({_one_line(exc)}); log in with `wandb login`, or set "
                               f"WANDB_MODE=offline to log offline (or drop the W&B option)") from exc

    def _sink_failed(self, sink: str, step: int, exc: BaseException) -> None:
        _warn(f"{sink} logging failed at step {step} ({_one_line(exc)}); {sink} is off for the rest of this run, "
              f"{self.path} still records every step")

    # -- logging ------------------------------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        """Record one step: ``row`` holds ``"step"`` (an int) and the step's values.

        The row goes to the JSONL file as is (one ``json.dumps`` line, flushed; its write errors propagate); its
        numeric values (:func:`scalars`; None is skipped) go to TensorBoard and W&B at that step. A sink that
        raises is switched off with one warning on stderr.
        """
        if self._closed:
            raise ValueError("MetricsLogger.log: the logger is closed")
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"MetricsLogger.log: the row needs an int 'step', got {row!r}")
        line = json.dumps(row) + "\n"  # before any write: an unserialisable row writes nothing
        self._file.write(line)
        self._file.flush()
        values = scalars(row)
        if self._writer is not None:
            try:
                for tag, value in values.items():
                    self._writer.add_scalar(tag, value, global_step=step)
                self._writer.flush()  # watchable at once, and nothing lost to a kill
            except Exception as exc:
                self._sink_failed("TensorBoard", step, exc)
                self._close_writer(quiet=True)
        if self._wandb is not None:
            try:
                self._wandb.log(values, step=step)
            except Exception as exc:
                self._sink_failed("W&B", step, exc)
                self._finish_wandb(quiet=True)

    def _close_writer(self, quiet: bool = False) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as exc:
            if not quiet:
                _warn(f"TensorBoard: closing the event file failed ({_one_line(exc)})")

    def _finish_wandb(self, quiet: bool = False) -> None:
        run, self._wandb = self._wandb, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:
            if not quiet:
                _warn(f"W&B: finishing the run failed ({_one_line(exc)})")

    def close(self) -> None:
        """Finish the W&B run, close TensorBoard's event file (their failures: a warning) and the JSONL file (its
        errors propagate). Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._finish_wandb()
            self._close_writer()
        finally:
            if self._file is not None:
                file, self._file = self._file, None
                file.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["MetricsLogger", "TAGS", "read_metrics", "scalars", "tag_for", "wandb_host", "wandb_reachable"]
