"""Autotune config pruning that works for an explicit GPU target as well as for the current device.

Every autotuned kernel of the package is declared with :func:`tuned`, which wraps ``triton.autotune`` and
registers the kernel's GPU configs and its pruning rule under a short name. A rule is a plain function
``rule(configs, args, target) -> list`` of the launch's arguments (``named_args`` and constexprs, as Triton
passes them to ``early_config_prune``) and a :class:`Target`. The same rule then serves

* the autotuner at run time, with :func:`current_target` (the current CUDA device), and
* ``tools/triton_compile_check.py``, which calls :func:`kept_configs` with ``SM90A`` / ``SM80`` and compiles
  exactly the configs a launch on that GPU would benchmark,

so the check and the runtime agree by construction. After the rule, ``AIMV2_AUTOTUNE_MAX_CONFIGS=N`` (unset:
no cap) keeps the first N configs in the kernel's preference order; every config list is written best-first
for an H100/H200 (expected order, see each list's comment), so a capped autotune still tries the likely best.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any, Callable

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_CONFIGS_ENV = "AIMV2_AUTOTUNE_MAX_CONFIGS"


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU the configs are pruned for: compute capability and opt-in shared memory per block (bytes)."""
    capability: int  # 10 * major + minor, e.g. 90
    max_shared_memory: int
    arch: str = ""  # ptxas name without "sm_", e.g. "90a"; informative only

    @property
    def hopper(self) -> bool:
        """sm_90 or newer: the register tables measured for sm_90a (wgmma) apply; sm_80-89 (mma.sync, another
        register layout) get those of sm_80. Newer GPUs (sm_100+) are not measured and get the sm_90a ones."""
        return self.capability >= 90


SM90A = Target(90, 227 * 1024, "90a")  # H100 / H200: 227 KiB opt-in shared memory per block
SM80 = Target(80, 163 * 1024, "80")  # A100: 163 KiB
TARGETS = {"90a": SM90A, "90": SM90A, "80": SM80}


@functools.lru_cache(maxsize=None)
def _device_target(device_index: int) -> Target:
    driver = triton.runtime.driver.active
    major, minor = driver.get_device_capability(device_index)
    props = driver.utils.get_device_properties(device_index)  # "max_shared_mem": the opt-in limit per block
    capability = 10 * major + minor
    return Target(capability, int(props["max_shared_mem"]), f"{capability}{'a' if capability == 90 else ''}")


def current_target() -> Target:
    """The current CUDA device as a :class:`Target` (GPU only; queried once per device)."""
    return _device_target(triton.runtime.driver.active.get_current_device())


def max_configs() -> int | None:
    """``AIMV2_AUTOTUNE_MAX_CONFIGS`` as a positive int, or None when unset or empty."""
    raw = os.environ.get(MAX_CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{MAX_CONFIGS_ENV} must be a positive integer, got {raw!r}")
    return n


def cap_configs(configs: list) -> list:
    """The first ``AIMV2_AUTOTUNE_MAX_CONFIGS`` configs (all when unset); never empties a non-empty list."""
    n = max_configs()
    return list(configs) if n is None else list(configs)[:n]


@dataclasses.dataclass
class TunedKernel:
    """A registered autotuned kernel: its JIT function, its GPU configs (best first) and its pruning rule."""
    name: str
    configs: list
    rule: Callable[[list, dict, Target], list]
    fn: object = None  # the triton.JITFunction, set by :func:`tuned`

    def kept(self, target: Target, args: dict, configs: list | None = None) -> list:
        """The configs a launch with ``args`` benchmarks on ``target``: the rule's, then the cap."""
        configs = self.configs if configs is None else configs
        kept = self.rule(list(configs), args, target)
        if not kept:  # every rule has a fallback; an empty list is a bug in the rule
            raise RuntimeError(f"{self.name}: pruning left no config for {target} and {args}")
        return cap_configs(kept)

    def __call__(self, configs, named_args, **kwargs):
        """``early_config_prune`` for ``triton.autotune`` (called on a GPU, once per autotune key)."""
        if INTERPRET or len(configs) == 1:
            return configs
        return self.kept(current_target(), {**named_args, **kwargs}, configs)


REGISTRY: dict[str, TunedKernel] = {}
# Modules that declare tuned kernels, imported by kept_configs() so that the registry is complete.
_MODULES = ("attention_forward", "attention_backward", "patch_mse", "cross_entropy")


def tuned(name: str, configs: list, rule: Callable[[list, dict, Target], list], *,
          interpret_configs: list | None = None, **autotune_kwargs: Any,
          ) -> Callable[[triton.runtime.KernelInterface], triton.runtime.Autotuner]:
    """``triton.autotune`` over ``configs`` with ``rule`` (see the module docstring), registered as ``name``.

    Under ``TRITON_INTERPRET=1`` the autotuner gets ``interpret_configs`` instead when given (one small config:
    tests neither autotune nor wait). Can decorate several autotuners of one JIT function (same name).
    """
    entry = REGISTRY.setdefault(name, TunedKernel(name, list(configs), rule))
    if entry.rule is not rule:
        raise ValueError(f"tuned({name!r}): registered twice with different rules")

    def decorate(fn):
        entry.fn = fn
        use = interpret_configs if INTERPRET and interpret_configs is not None else configs
        return triton.autotune(configs=use, prune_configs_by={"early_config_prune": entry}, **autotune_kwargs)(fn)
    return decorate


def import_kernels() -> dict[str, TunedKernel]:
    """Import every module that declares tuned kernels, so that :data:`REGISTRY` is complete; return it."""
    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return REGISTRY


def kept_configs(kernel_name: str, target: Target, **args: Any) -> list:
    """The configs ``kernel_name`` keeps on ``target`` for a launch with ``args`` (named args and constexprs)."""
    return import_kernels()[kernel_name].kept(target, args)
