"""The optional dependencies of the application layer, and one clear error when one is missing.

The kernels (``aimv2_kernels``) and the model (``import aimv2``) need torch, numpy and safetensors only. Training,
evaluation and real data also need Pillow, matplotlib, tqdm and sentencepiece: the ``train`` extra,
``pip install 'aimv2-kernels[train]'`` (``make demo`` and ``make test`` install it).
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = "pip install 'aimv2-kernels[train]'"


def require(module: str, needed_by: str) -> ModuleType:
    """``import module``, or an ImportError that names what needs it and how to install the ``train`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(f"{needed_by} needs {top!r}, which is in the 'train' extra: {INSTALL}") from exc
