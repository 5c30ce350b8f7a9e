"""The house rules docs/architecture.md states, checked: no function in src/ over 80 lines, no module over 400.

Lines are counted from a ``def`` to its last line, docstring and comments included, as a reader scrolls them.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qlorakit"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function or method in ``source`` longer than ``limit`` lines."""
    found = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    if child.end_lineno - start + 1 > limit:
                        found.append((name, child.end_lineno - start + 1))
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return found


def test_no_function_over_80_lines():
    too_long = [f"{p.relative_to(SRC)}:{name} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
                for name, n in long_functions(p.read_text(), MAX_FUNCTION_LINES)]
    assert not too_long, "split these: " + ", ".join(too_long)


def test_no_module_over_400_lines():
    too_long = [f"{p.relative_to(SRC)} ({n} lines)" for p in sorted(SRC.rglob("*.py"))
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not too_long, "split these: " + ", ".join(too_long)


def test_the_counter_catches_a_long_function_and_its_nested_twin():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n", MAX_FUNCTION_LINES) == [("f", MAX_FUNCTION_LINES + 1)]
    nested = "class C:\n    def m(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(nested, MAX_FUNCTION_LINES) == [("C.m", MAX_FUNCTION_LINES + 1)]
    assert long_functions("def g():\n    return 1\n", MAX_FUNCTION_LINES) == []
