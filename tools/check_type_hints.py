"""Every public function and method of ``aimv2`` and ``aimv2_kernels`` has type hints on every argument and a
return annotation (``make lint`` runs this after ruff).

Public: the name does not start with ``_``, nor does any enclosing class; functions nested in functions are not
public. Left out: ``@triton.jit`` kernels (Triton reads their arguments untyped) and functions registered through
``torch.library`` decorators (their signatures are the op schemas, checked by torch).

Usage: python tools/check_type_hints.py [PATH ...]   (default: aimv2 aimv2_kernels); exit status 1 when any is
missing, with one line per function.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXEMPT_DECORATORS = ("jit", "register_fake", "custom_op", "register_kernel")


def _exempt(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(word in ast.unparse(d) for d in fn.decorator_list for word in EXEMPT_DECORATORS)


def missing_hints(source: str, filename: str = "<string>") -> list[str]:
    """``"FILE:LINE name: what is missing"`` for each public function of ``source`` that lacks a hint."""
    out: list[str] = []

    def visit(node: ast.AST, public: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, public and not child.name.startswith("_"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not public or child.name.startswith("_") or _exempt(child):
                    continue
                a = child.args
                names = [x for x in a.posonlyargs + a.args + a.kwonlyargs
                         if x.annotation is None and x.arg not in ("self", "cls")]
                missing = [x.arg for x in names]
                for star, arg in (("*", a.vararg), ("**", a.kwarg)):
                    if arg is not None and arg.annotation is None:
                        missing.append(star + arg.arg)
                if child.returns is None and child.name != "__init__":
                    missing.append("return")
                if missing:
                    out.append(f"{filename}:{child.lineno} {child.name}: no hint for {', '.join(missing)}")

    visit(ast.parse(source, filename), True)
    return out


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv else ["aimv2", "aimv2_kernels"])]
    problems: list[str] = []
    for base in paths:
        base = base if base.is_absolute() else ROOT / base
        for file in sorted(base.rglob("*.py") if base.is_dir() else [base]):
            problems += missing_hints(file.read_text(), str(file.relative_to(ROOT)))
    for line in problems:
        print(line)
    print(f"check_type_hints: {len(problems)} public function(s) without full type hints" if problems
          else "check_type_hints: every public function has type hints")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
