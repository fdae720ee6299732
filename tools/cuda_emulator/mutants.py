"""Sanity check of the emulator itself: deliberately broken copies of the kernel must fail run_cases.py.

    python tools/cuda_emulator/mutants.py [NAME ...]   (after build.py)

Each mutant applies one text substitution to the generated source (prefix_attention_emu.cpp), builds
libmut_<name>.so and runs a few cases; a mutant that passes means the tests cannot see that kind of bug.
"""
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT_DIR = REPO / "build" / "cuda_emulator"
PY = sys.executable

MUTANTS = {
    # ldmatrix addressing: the two 8-row halves of the 16 x 16 block swapped.
    "ldmatrix_rows": ("((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8",
                      "((lane >> 4) & 1) * 8) * LD + n0 + ((lane >> 3) & 1) * 8"),
    # P reused as the A operand with registers 1 and 2 swapped.
    "acc_to_a": ("  a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);\n"
                 "  a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);",
                 "  a[2] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);\n"
                 "  a[1] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);"),
    # Query tiles ignore the prefix when choosing the keys to load.
    "key_end": ("return imin(S, imax(m0 + bm, M));", "return imin(S, m0 + bm);"),
    # Fully-visible test off by one (a tile whose last key is one past the prefix runs unmasked).
    "unmasked_off_by_one": ("return n0 + bn <= imax(M, m0 + 1) &&", "return n0 + bn <= imax(M + 1, m0 + 1) &&"),
    # dK not scaled.
    "dk_scale": ("stage_acc<D, T>(sKo, dk, p.scale, p.scale, lane);", "stage_acc<D, T>(sKo, dk, 1.f, 1.f, lane);"),
}
CASES = ["D=64 S=64 prefix=[", "D=64 S=65 prefix=[", "D=128 S=130 prefix=random", "full-visible"]


def main():
    names = sys.argv[1:] or list(MUTANTS)
    gen = (OUT_DIR / "prefix_attention_emu.cpp").read_text()
    cuh_path = REPO / "csrc" / "cuda" / "prefix_attention.cuh"
    cuh = cuh_path.read_text()
    survived = []
    for name in names:
        old, new = MUTANTS[name]
        src, header, hp = gen, cuh, None
        if old in src:
            src = src.replace(old, new, 1)
        else:
            assert old in header, name
            header = header.replace(old, new, 1)
            hp = OUT_DIR / f"mut_{name}.cuh"
            hp.write_text(header)
            src = src.replace(str(cuh_path), str(hp))
        path = OUT_DIR / f"mut_{name}.cpp"
        path.write_text(src)
        lib = OUT_DIR / f"libmut_{name}.so"
        subprocess.run(["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", f"-I{HERE}",
                        "-I/usr/local/cuda/include", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-fno-strict-aliasing",
                        "-Wno-unknown-pragmas", str(path), "-o", str(lib)], check=True)
        caught = False
        for case in CASES:
            r = subprocess.run([PY, str(HERE / "run_cases.py"), "--lib", str(lib), "--only", f"bf16 {case}"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                caught = True
                first = next((ln for ln in r.stdout.splitlines() if ln.startswith("[FAIL]")), r.stderr[-300:])
                print(f"mutant {name}: caught by '{case}': {first[:200]}", flush=True)
                break
        if not caught:
            print(f"mutant {name}: SURVIVED", flush=True)
            survived.append(name)
        for f in (path, lib, hp):
            if f is not None:
                f.unlink()
    print("survivors:", survived)


if __name__ == "__main__":
    main()
