"""tools/cuda_compile_check.py and tools/triton_compile_check.py: the ptxas report parsers, the Triton check's
verdicts and specializations, and the autotune pruning it shares with the runtime (aimv2_kernels.triton.tuning).
No compiles here: they run in `make cuda-check` and `python tools/triton_compile_check.py`."""
import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location(
    "cuda_compile_check", Path(__file__).resolve().parents[1] / "tools" / "cuda_compile_check.py")
check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check)

LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fwdILi64EEvPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fwdILi64EEvPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 24576 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3bwdv' for 'sm_90a'
ptxas info    : Function properties for _Z3bwdv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_ptxas_rows():
    rows = check.parse_ptxas(LOG)
    assert rows == [
        {"kernel": "_Z3fwdILi64EEvPf", "registers": 168, "smem": 24576, "stack": 16, "spill_stores": 8,
         "spill_loads": 12},
        {"kernel": "_Z3bwdv", "registers": 40, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0},
    ]


def test_nvcc_flags_follow_torch_extension():
    flags = check.nvcc_flags("90a")
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-Xptxas" in flags
    assert "-D__CUDA_NO_HALF_OPERATORS__" in flags  # what CUDAExtension passes, so the check sees the same code


# ------------------------------------------------------------------ tools/triton_compile_check.py (no compiles)
TSPEC = importlib.util.spec_from_file_location(
    "triton_compile_check", Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py")
tcheck = importlib.util.module_from_spec(TSPEC)
TSPEC.loader.exec_module(tcheck)

# Triton 3.9 runs ptxas-blackwell (3.6: ptxas) and prints its report through TRITON_DUMP_PTXAS_LOG.
TRITON_LOG = """\
ptxas-blackwell info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas-blackwell info    : Compiling entry function '_attn_bwd_dkdv_kernel' for 'sm_80'
ptxas-blackwell info    : Function properties for _attn_bwd_dkdv_kernel
    72 bytes stack frame, 80 bytes spill stores, 96 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 72 bytes cumulative stack size, 480 bytes cmem[0]
ptxas-blackwell info    : Compile time = 188.949 ms
"""


def _row(**kw):
    row = {"kernel": "attn_fwd", "spec": "D=128 bf16 prefix", "arch": "90a", "config": "BLOCK_M=128", "kept": True,
           "error": None, "registers": 168, "spill_stores": 0, "spill_loads": 0, "stack": 0, "shared": 1024,
           "static_smem": 0, "wgmma": True, "mma": "wgmma", "ptx_target": "sm_90a", "seconds": 1.0}
    row.update(kw)
    return row


def test_triton_check_parses_ptxas_report():
    assert tcheck.parse_ptxas(TRITON_LOG) == {
        "kernel": "_attn_bwd_dkdv_kernel", "registers": 255, "stack": 72, "spill_stores": 80, "spill_loads": 96,
        "static_smem": 0}
    clean = LOG.split("ptxas info    : Compiling entry function '_Z3bwdv'")[1]  # the nvcc report's second kernel
    assert tcheck.parse_ptxas("ptxas info    : Compiling entry function '_Z3bwdv'" + clean)["registers"] == 40
    assert tcheck.parse_ptxas(LOG)["static_smem"] == 24576
    assert tcheck.parse_ptxas("ptxas fatal   : Unresolved extern function 'f'") is None


def test_triton_check_exit_status():
    assert tcheck.exit_status([_row(), _row(arch="80")], []) == 0
    spill = _row(spill_stores=8, spill_loads=8, stack=16)
    assert tcheck.problems(spill) and tcheck.exit_status([_row(), spill], []) == 1
    assert tcheck.exit_status([_row(stack=16)], []) == 1  # local memory without "spills" counts too
    assert tcheck.exit_status([_row(error="CompilationError: boom", registers=None)], []) == 1
    assert tcheck.exit_status([_row(shared=232449)], []) == 1 and tcheck.exit_status([_row(shared=232448)], []) == 0
    assert tcheck.exit_status([_row(arch="80", shared=166913)], []) == 1
    assert tcheck.exit_status([_row(kept=False, spill_stores=8, stack=8)], []) == 0  # --all: pruned, reported only
    assert tcheck.exit_status([_row()], ["attn_fwd D=128 sm_80: no config kept"]) == 1


def test_triton_check_rejects_unknown_arch():
    with pytest.raises(SystemExit) as exc:
        tcheck.main(["--archs", "75"])
    assert exc.value.code == 2


def _launch_args(kernel):
    """A spread of pruner arguments per kernel: every head dim and dtype, small to large V and patches."""
    if kernel.startswith("attn"):
        return [dict(Q=torch.empty(1, dtype=dt), HEAD_DIM=d) for d in (16, 32, 64, 128)
                for dt in (torch.float32, torch.bfloat16, torch.float16)]
    if kernel == "patch_mse":
        return [dict(BLOCK_P=p) for p in (1, 16, 64, 1024, 4096, 1 << 16)]
    return [dict(V=v, LSE_MODE=1, STORE_LOSS=True, COMPUTE_GRAD=True) for v in (1, 50, 1000, 32000, 256000)]


def test_pruners_never_return_an_empty_list():
    from aimv2_kernels.triton import tuning
    registry = tuning.import_kernels()
    assert set(registry) == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "patch_mse", "ce_rows"}
    small = tuning.Target(86, 99 * 1024, "86")  # a consumer GPU: less shared memory than any config wants
    tiny = tuning.Target(75, 16 * 1024, "75")
    for name, entry in registry.items():
        assert entry.fn is not None and len(entry.configs) > 1
        for target in (tuning.SM90A, tuning.SM80, small, tiny):
            for args in _launch_args(name):
                kept = tuning.kept_configs(name, target, **args)
                assert kept and all(any(c is k for c in entry.configs) for k in kept), (name, target, args)


def test_autotune_max_configs_cap(monkeypatch):
    from aimv2_kernels.triton import tuning
    args = dict(Q=torch.empty(1, dtype=torch.bfloat16), HEAD_DIM=64)
    monkeypatch.delenv(tuning.MAX_CONFIGS_ENV, raising=False)
    full = tuning.kept_configs("attn_fwd", tuning.SM90A, **args)
    assert len(full) > 2
    for n in (1, 2):
        monkeypatch.setenv(tuning.MAX_CONFIGS_ENV, str(n))
        assert tuning.kept_configs("attn_fwd", tuning.SM90A, **args) == full[:n]  # preference order kept
    monkeypatch.setenv(tuning.MAX_CONFIGS_ENV, "1000")
    assert tuning.kept_configs("attn_fwd", tuning.SM90A, **args) == full
    monkeypatch.setenv(tuning.MAX_CONFIGS_ENV, "")
    assert tuning.kept_configs("attn_fwd", tuning.SM90A, **args) == full
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(tuning.MAX_CONFIGS_ENV, bad)
        with pytest.raises(ValueError, match=tuning.MAX_CONFIGS_ENV):
            tuning.kept_configs("attn_fwd", tuning.SM90A, **args)
    # The cap applies after the rule (here: shared memory) and never empties the list.
    monkeypatch.setenv(tuning.MAX_CONFIGS_ENV, "1")
    tiny = tuning.Target(75, 16 * 1024, "75")
    assert len(tuning.kept_configs("attn_bwd_dkdv", tiny, Q=torch.empty(1), HEAD_DIM=128)) == 1
    # What the autotuner calls (early_config_prune): unchanged under the interpreter, which has one config.
    entry = tuning.REGISTRY["ce_rows"]
    assert entry(entry.configs[:1], {"V": 32000}) == entry.configs[:1]


def test_triton_check_specializes_like_a_launch():
    """The binder-derived signature: 16-aligned pointers and strides divisible by 16 get tt.divisibility 16,
    unit strides become constexprs (no compile; the full compile runs in tools/triton_compile_check.py)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction
    spec = next(s for s in tcheck._specs() if s.kernel == "patch_mse")
    fn = tcheck._jit_fn("patch_mse")
    fn = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # under TRITON_INTERPRET=1: interpreted
    config = tcheck._all_configs("patch_mse")[0]
    backend = make_backend(GPUTarget("cuda", 90, 32))
    sig, consts, attrs, opts = tcheck._signature(fn, backend, spec.args, {**spec.constexprs, **config.kwargs},
                                                 {"num_warps": 4, "num_stages": 3})
    names = fn.arg_names
    assert sig["pred_ptr"] == "*bf16" and sig["stride_iw"] == "constexpr" and sig["ROWS"] == "constexpr"
    assert attrs[(names.index("pred_ptr"),)] == [["tt.divisibility", 16]]
    assert attrs[(names.index("stride_ih"),)] == [["tt.divisibility", 16]]  # 224
    assert consts[(names.index("BLOCK_P"),)] == 1024 and opts["num_warps"] == 4


def test_triton_check_mma_kind_and_limits():
    from aimv2_kernels.triton import tuning
    assert tcheck.mma_kind("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...}") == "wgmma"
    assert tcheck.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...}") == "mma"
    assert tcheck.mma_kind("wgmma.mma_async ...\n mma.sync.aligned ...") == "wgmma+mma"
    assert tcheck.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "fma"
    # The check's shared-memory limits are the pruners' targets (232448 and 166912 bytes per block).
    assert tcheck.SHARED_LIMIT["90a"] == tuning.SM90A.max_shared_memory == 232448
    assert tcheck.SHARED_LIMIT["80"] == tuning.SM80.max_shared_memory == 166912


def test_attention_rule_tables():
    """fp32 gets only its own tiles, fp16/bf16 never get them; a tile in a spill table is never kept there; every
    specialization the compile check builds keeps at least one config on both targets."""
    from aimv2_kernels.triton import attention_backward as bwd
    from aimv2_kernels.triton import attention_forward as fwd
    from aimv2_kernels.triton import tuning
    tables = {"attn_fwd": (fwd._FWD_TILES_FP32, fwd._FWD_SPILLS), "attn_bwd_dkdv": (bwd._DKDV_TILES_FP32,
              bwd._DKDV_SPILLS), "attn_bwd_dq": (bwd._DQ_TILES_FP32, bwd._DQ_SPILLS)}
    for name, (fp32_tiles, spills) in tables.items():
        for target in (tuning.SM90A, tuning.SM80):
            for head_dim in (16, 32, 64, 128):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    kept = [fwd.tile(c) for c in tuning.kept_configs(name, target, Q=torch.empty(1, dtype=dtype),
                                                                     HEAD_DIM=head_dim)]
                    elt = dtype.itemsize
                    assert all((t in fp32_tiles) == (elt == 4) for t in kept), (name, target, head_dim, dtype)
                    bad = spills.get((target.hopper, elt, 128 if head_dim > 64 else 64), set())
                    assert not set(kept) & bad, (name, target, head_dim, dtype)
        for key, tiles in spills.items():
            assert tiles <= {fwd.tile(c) for c in tuning.REGISTRY[name].configs}, (name, key)  # no stale entries
    for spec in tcheck._specs():
        for arch in ("90a", "80"):
            assert tcheck._kept_indices(spec, arch), (spec.kernel, spec.label, arch)
    # --all compiles the configs of the inputs' precision only.
    spec = next(s for s in tcheck._specs() if s.kernel == "attn_fwd" and "fp32" in s.label)
    configs = tcheck._all_configs("attn_fwd")
    assert [fwd.tile(configs[i]) for i in tcheck._candidate_indices(spec)] == fwd._FWD_TILES_FP32


def test_triton_check_load_kind_and_tma_specializations():
    """The check compiles the load path each target runs (TMA for fp16/bf16 attention on sm_90a, pointers on sm_80
    and for fp32) and says which one the PTX uses."""
    assert tcheck.load_kind("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [...]") \
        == "tma"
    assert tcheck.load_kind("cp.async.cg.shared.global [ %r1 + 0 ], [ %rd2 + 0 ], 0x10, %r3;") == "cp.async"
    assert tcheck.load_kind("ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];") == "ld"
    seen = set()
    for spec in tcheck._specs():
        if spec.kernel not in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
            assert not spec.per_arch, spec
            continue
        fp32 = "fp32" in spec.label
        assert spec.per_arch["90a"] == {"TMA": not fp32} and spec.per_arch["80"] == {"TMA": False}, spec.label
        seen.add(fp32)
    assert seen == {True, False}


# ------------------------------------------------------------------------------ tools/check_type_hints.py
HINTS_SPEC = importlib.util.spec_from_file_location(
    "check_type_hints", Path(__file__).resolve().parents[1] / "tools" / "check_type_hints.py")
hints = importlib.util.module_from_spec(HINTS_SPEC)
HINTS_SPEC.loader.exec_module(hints)


def test_check_type_hints_finds_what_is_missing():
    source = '''
import triton
def typed(x: int, *a: int, y: str = "", **k: float) -> int: ...
def untyped_arg(x, y: int) -> None: ...
def no_return(x: int): ...
def _private(x): ...
class Public:
    def __init__(self, x: int): ...
    def method(self, x) -> None: ...
    def _hidden(self, x): ...
class _Private:
    def method(self, x): ...
@triton.jit
def kernel(X, Y): ...
def outer(x: int) -> None:
    def inner(y): ...
def star(*args, **kwargs) -> None: ...
'''
    found = hints.missing_hints(source, "m.py")
    assert found == ["m.py:4 untyped_arg: no hint for x", "m.py:5 no_return: no hint for return",
                     "m.py:9 method: no hint for x", "m.py:17 star: no hint for *args, **kwargs"]
