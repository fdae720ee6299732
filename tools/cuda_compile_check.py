"""Compile-check the CUDA sources with this machine's nvcc and print ptxas's resource report.

Every ``csrc/cuda/*.cu`` is compiled (``-c``, object discarded) for each architecture, with the flags torch's
``CUDAExtension`` uses (so ``-D__CUDA_NO_HALF_OPERATORS__`` and friends apply here too) and ``-Xptxas -v``.
Every ``csrc/cuda/*_glue.cpp`` is syntax-checked with the host compiler against torch's headers: the glue uses
ATen and c10 core headers only, so a CPU build of torch suffices. Exits 1 on any compile error; with no nvcc
on the PATH it says so and exits 0 (``--require`` makes that an error).

Usage: python tools/cuda_compile_check.py [--archs 80,90a] [--require] [--jobs N] [--quiet]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

# nvcc's ptxas prints "ptxas info", Triton 3.9's "ptxas-blackwell info" (tools/triton_compile_check.py reads both).
_FUNC = re.compile(r"ptxas\S*\s+info\s*: (?:Compiling entry function|Function properties for) '([^']+)'")
_USED = re.compile(r"ptxas\S*\s+info\s*: Used (\d+) registers(.*)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvcc_flags(arch: str) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return ["-O3", "-std=c++17", *COMMON_NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
            "-Xptxas", "-v", "-DAIMV2_WITH_CUDA=1"]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> list[dict]:
    """One row per kernel: name, registers, smem (static bytes), stack, spill stores/loads."""
    rows, current, spills = [], None, {}
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            current = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and current is not None:
            spills[current] = tuple(int(x) for x in m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            smem = _SMEM.search(m.group(2))
            stack, st, ld = spills.get(current, (0, 0, 0))
            rows.append({"kernel": current, "registers": int(m.group(1)), "smem": int(smem.group(1)) if smem else 0,
                         "stack": stack, "spill_stores": st, "spill_loads": ld})
            current = None
    return rows


def compile_cu(nvcc: str, source: str, arch: str) -> tuple[str, str, bool, str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *nvcc_flags(arch), "-I", CUDA_DIR, "-c", source, "-o", os.path.join(tmp, "out.o")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return source, arch, proc.returncode == 0, proc.stdout + proc.stderr, time.perf_counter() - t0


def check_glue(source: str) -> tuple[str, bool, str]:
    from torch.utils.cpp_extension import include_paths
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-DAIMV2_WITH_CUDA=1", "-I", CUDA_DIR,
           "-I", sysconfig.get_paths()["include"]]
    for path in include_paths():
        cmd += ["-isystem", path]
    proc = subprocess.run(cmd + [source], capture_output=True, text=True)
    return source, proc.returncode == 0, proc.stdout + proc.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90a", help="comma-separated compute capabilities (default 80,90a)")
    ap.add_argument("--require", action="store_true", help="fail when nvcc is missing")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quiet", action="store_true", help="print only the table and errors")
    ap.add_argument("sources", nargs="*", help="limit to these .cu / _glue.cpp files")
    args = ap.parse_args(argv)

    cu = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    glue = sorted(glob.glob(os.path.join(CUDA_DIR, "*_glue.cpp")))
    if args.sources:
        wanted = {os.path.abspath(s) for s in args.sources}
        cu, glue = [s for s in cu if s in wanted], [s for s in glue if s in wanted]
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                     if os.environ.get("CUDA_HOME") else None)
    failed = False

    for source, ok, log in map(check_glue, glue):
        rel = os.path.relpath(source, ROOT)
        print(f"glue  {rel}: {'ok' if ok else 'FAILED'}")
        if not ok or (log.strip() and not args.quiet):
            print(log)
        failed |= not ok

    if nvcc is None:
        print("cuda_compile_check: nvcc not found; .cu files were not compiled"
              + (" (--require: failing)" if args.require else " (skipped)"))
        return 1 if (args.require or failed) else 0
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    print(f"nvcc: {version}; archs: {', '.join('sm_' + a for a in archs)}; {len(cu)} .cu file(s)")
    jobs = [(s, a) for s in cu for a in archs]
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda sa: compile_cu(nvcc, *sa), jobs))
    rows = []
    for source, arch, ok, log, seconds in results:
        rel = os.path.relpath(source, ROOT)
        print(f"nvcc  {rel} sm_{arch}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)")
        if not ok:
            print(log)
            failed = True
            continue
        warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
        if warnings:
            print("\n".join(warnings))
        for row in parse_ptxas(log):
            rows.append({"file": os.path.basename(source), "arch": arch, **row})
    if rows:
        names = demangle(sorted({r["kernel"] for r in rows}))
        print("\nptxas report (registers per thread, static shared memory, stack frame and spills in bytes):")
        header = (f"{'file':<24} {'arch':<5} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st':>8} {'spill ld':>8}"
                  "  kernel")
        print(header)
        print("-" * len(header))
        for r in sorted(rows, key=lambda r: (r["file"], r["arch"], names[r["kernel"]])):
            name = names[r["kernel"]]
            name = name if len(name) <= 110 else name[:107] + "..."
            flag = "  <- spills" if r["spill_stores"] or r["spill_loads"] else ""
            print(f"{r['file']:<24} sm_{r['arch']:<3} {r['registers']:>4} {r['smem']:>6} {r['stack']:>5} "
                  f"{r['spill_stores']:>8} {r['spill_loads']:>8}  {name}{flag}")
    print("cuda_compile_check: " + ("FAILED" if failed else "all sources compiled"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
