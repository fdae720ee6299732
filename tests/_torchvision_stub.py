"""A stand-in for the few ``torchvision`` names that ``import timm`` needs, for tests/test_timm_parity.py only.

Why: timm imports torchvision when it is imported (``timm.layers`` for ``FrozenBatchNorm2d``, ``timm.data`` for
its transforms and datasets), but there is no torchvision build for the CPU torch of this project's test
environment (PyPI's torchvision for this torch version is a CUDA build whose C extension does not load with the
CPU torch, and the next one requires a newer torch), so timm is installed without its dependencies
(``pip install --no-deps timm``) and, in the parity test's process only and only while it runs, these modules
stand in for torchvision.

Nothing the parity test compares goes through them: a timm AIMv2 ``VisionTransformer`` (patch embedding,
RMSNorm, attention, SwiGLU, ``resample_abs_pos_embed``) is torch only. To make that certain, every class here
raises :class:`StubUsed` when it is instantiated, and the modules hold nothing else (any other torchvision name
is missing, as in a torchvision without that feature: timm's ``try: ... except ImportError`` fallbacks take
it). So a timm code path that used torchvision would fail the test instead of comparing against a fake.

Provided, exactly what timm 1.0's import-time statements name:

- ``torchvision.ops.misc.FrozenBatchNorm2d`` (``timm.layers.create_norm``, ``timm.layers.norm_act``,
  ``timm.utils.model``)
- ``torchvision.transforms.ToTensor`` (a base class in ``timm.data.transforms``) and
  ``torchvision.transforms.functional.InterpolationMode`` (an Enum of the mode names: ``timm.data.transforms``
  builds lookup dicts keyed by its members at import time; only timm's data transforms use it)
- ``torchvision.datasets.{CIFAR10, CIFAR100, MNIST, KMNIST, FashionMNIST, ImageFolder}``
  (``timm.data.dataset_factory``)
"""
from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import sys
import types
from collections.abc import Iterator

__all__ = ["StubUsed", "MODULES", "CLASSES", "installed"]

MODULES = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
           "torchvision.transforms.functional", "torchvision.datasets")
# module -> the stand-in classes it holds (each raises StubUsed when instantiated)
CLASSES = {"torchvision.ops.misc": ("FrozenBatchNorm2d",),
           "torchvision.transforms": ("ToTensor",),
           "torchvision.datasets": ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder")}


class StubUsed(RuntimeError):
    """Raised by every stand-in class when it is instantiated: something used torchvision for real."""


class _Stub:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise StubUsed(f"{type(self).__name__} is a stand-in for torchvision's (tests/_torchvision_stub.py) "
                       f"and cannot be used")


def _build() -> dict[str, types.ModuleType]:
    mods = {}
    for name in MODULES:
        m = types.ModuleType(name, "stand-in for torchvision (tests/_torchvision_stub.py)")
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec works on it
        mods[name] = m
    for module, classes in CLASSES.items():
        for cls in classes:
            setattr(mods[module], cls, type(cls, (_Stub,), {"__module__": module}))
    mods["torchvision.transforms.functional"].InterpolationMode = enum.Enum("InterpolationMode", {
        k: k.lower() for k in ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")})
    for name in MODULES[1:]:  # submodules are attributes of their parents, as after a real import
        parent, _, child = name.rpartition(".")
        setattr(mods[parent], child, mods[name])
    return mods


@contextlib.contextmanager
def installed() -> Iterator[dict[str, types.ModuleType]]:
    """Put the stand-in modules into ``sys.modules`` for the duration (refused if a torchvision module is already
    imported); yields them. On exit they are removed again, together with every ``timm`` module imported
    meanwhile, so that nothing else in the process sees either (objects built inside keep working: they hold
    their own references)."""
    if any(name in sys.modules for name in MODULES):
        raise RuntimeError("a torchvision module is already imported; the stand-in would shadow it")
    before = set(sys.modules)
    mods = _build()
    sys.modules.update(mods)
    try:
        yield mods
    finally:
        for name in list(sys.modules):
            if name not in before and (name in MODULES or name == "timm" or name.startswith("timm.")):
                del sys.modules[name]
