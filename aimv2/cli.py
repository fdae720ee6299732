"""What the command-line tools (``aimv2-train``, ``aimv2-probe``) share: the argument parser, ``--device``, and
one error policy.

The error policy, the same for every tool (each ``main`` runs its body through :func:`run_main`):

- **Usage errors** (:class:`UsageError`, a ``ValueError``; argparse's own errors through :class:`Parser`): the
  command line is wrong or names something unusable as given: an unknown flag or value, a path that does not
  exist or holds nothing of the kind the flag expects, a trunk or checkpoint of another preset than
  ``--preset``. One line ``PROG: error: MESSAGE`` on stderr, exit status 2.
- **Operational errors** (:class:`OperationalError`, a ``RuntimeError``, and
  :class:`aimv2.checkpoint.CheckpointError`): the command was well formed, but what it had to read or write
  failed: a checkpoint that is missing, incomplete, corrupt or does not fit; weights that cannot be read;
  data whose every image is unreadable; an output file that cannot be written. One line, exit status 1.
- Anything else is a bug and keeps its traceback: the tools never catch a bare ``ValueError`` or
  ``Exception`` around their work; they convert the documented errors of a library call into one of the two
  types above at that call.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from .checkpoint import CheckpointError

__all__ = ["Parser", "UsageError", "OperationalError", "OPERATIONAL_ERRORS", "resolve_device", "check_backend",
           "one_line", "run_main"]


class UsageError(ValueError):
    """A bad flag value, or a flag naming something unusable (printed as one line, exit status 2)."""


class OperationalError(RuntimeError):
    """A well-formed command whose input or output failed: unreadable files, missing data (one line, exit 1)."""


# The operational error types of the library that a tool reports as one line with exit status 1.
OPERATIONAL_ERRORS = (OperationalError, CheckpointError)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``PROG: error: MESSAGE``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def resolve_device(name: str | None) -> torch.device:
    """``--device``: None -> cuda when available, else cpu; ``cpu``, ``cuda`` or ``cuda:N`` otherwise.

    Raises UsageError for anything else, and for cuda on a machine without CUDA."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def check_backend(backend: str, device: torch.device, ops: tuple[str, ...]) -> None:
    """``--backend``: raise UsageError, with aimv2_kernels' reason, when an explicit backend cannot run one of
    ``ops`` on ``device`` (checked before any work starts, instead of failing in the first forward).
    ``auto`` and ``reference`` always run."""
    if backend in ("auto", "reference"):
        return
    from aimv2_kernels import BackendUnavailableError
    from aimv2_kernels._backend import resolve_backend

    for op in ops:
        try:
            resolve_backend(op, backend, device)
        except BackendUnavailableError as exc:
            raise UsageError(f"--backend {backend} cannot run on this machine: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    """The first line of ``str(exc)`` (``repr(exc)`` when it is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def run_main(prog: str, body: Callable[..., int], *args: Any, **kwargs: Any) -> int:
    """``body(*args, **kwargs)`` under the error policy: its exit status, or 2 after a usage error and 1 after
    an operational error, each printed as ``PROG: error: MESSAGE`` on stderr. Other exceptions propagate."""
    try:
        return body(*args, **kwargs)
    except UsageError as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OPERATIONAL_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 1


def check_output_file(path: str, flag: str = "--out") -> None:
    """``--out FILE``, checked before the work starts: a folder is a usage error, a path that cannot be written an
    operational one. An existing file is left as it is (opened for appending, not truncated)."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give the path of the file to write")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        raise OperationalError(f"{flag} {path}: cannot be written: {one_line(exc)}") from None


def write_json(path: str, report: Any, flag: str = "--out", *, allow_nan: bool = True) -> Path:
    """Write ``report`` as indented JSON to ``path`` (its folder created); OperationalError naming ``flag`` when it
    cannot be written."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, allow_nan=allow_nan) + "\n")
    except OSError as exc:
        raise OperationalError(f"{flag} {path}: {one_line(exc)}") from None
    return out
