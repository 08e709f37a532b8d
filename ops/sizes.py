"""The size budget of docs/architecture.md: the largest modules, classes and functions.

``python ops/sizes.py [PATH ...] [--top N] [--over]`` (default paths: processor ops/lib):
lines per module, and per class or function from its first decorator to its last line.
``--over`` lists only what is over the budget (module ~600, class ~250, function ~80);
each of those carries the reason it is long next to it in the code.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, NamedTuple

BUDGET: Final = {"module": 600, "class": 250, "function": 80}


class Size(NamedTuple):
    kind: str  # "module", "class" or "function"
    lines: int
    where: str  # path, or path:line name


def measure(paths: Iterable[Path]) -> list[Size]:
    """The size of every module under ``paths`` and of every class and function in them."""
    sizes: list[Size] = []
    for root in paths:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            text = path.read_text()
            sizes.append(Size("module", len(text.splitlines()), str(path)))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    last = node.end_lineno or node.lineno
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    sizes.append(Size(kind, last - first + 1, f"{path}:{node.lineno} {node.name}"))
    return sizes


def report(sizes: Sequence[Size], top: int, over: bool) -> list[str]:
    lines: list[str] = []
    for kind, budget in BUDGET.items():
        mine = sorted((s for s in sizes if s.kind == kind), key=lambda s: (-s.lines, s.where))
        shown = [s for s in mine if s.lines > budget] if over else mine[:top]
        title = "classes" if kind == "class" else f"{kind}s"
        lines.append(f"## {title} " + (f"over ~{budget}" if over else f"(largest {top})"))
        lines += [f"{s.lines:6d}  {s.where}" for s in shown]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/sizes.py", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="files or directories")
    parser.add_argument("--top", type=int, default=10, help="rows per kind (10)")
    parser.add_argument("--over", action="store_true", help="only what is over the budget")
    args = parser.parse_args(argv)
    paths = args.paths or [Path("processor"), Path("ops/lib")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    print("\n".join(report(measure(paths), args.top, args.over)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
