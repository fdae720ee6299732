"""tools/cuda_compile_check.py: the ptxas report parser (the compile itself runs in `make cuda-check`)."""
import importlib.util
from pathlib import Path

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
