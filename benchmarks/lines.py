"""Lines and source lines of `wmtp/`, next to the old loader's.

A source line holds at least one token of code: blank lines, comment-only lines and the lines
of docstrings (the string literal opening a module, class or function) do not count.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

NOT_CODE: Final = frozenset(
    {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
)
# The loading core as issue 4 names it (metadata, fetch, remap, instantiate, dispatch,
# resolve); the tools built on it (save, check, migrate) and the CLI are counted apart.
CORE_EXCLUDED: Final = frozenset({"cli.py", "__main__.py", "save.py", "check.py", "migrate.py"})
CORE_TARGET: Final = 350


class LineCount(msgspec.Struct, frozen=True):
    """Physical lines and source lines of one file."""

    module: str
    lines: int
    source_lines: int


# Facts from the public repository wooshikwon/wmtp at commit 12fff5d, as given in issue 4.
OLD_LOADER: Final = (
    LineCount("src/components/loader/standardized_model_loader.py", 529, 267),
    LineCount("src/utils/path_resolver.py", 155, 42),
    LineCount("src/utils/s3.py", 381, 169),
    LineCount("src/utils/optimized_s3_transfer.py", 325, 217),
)


def docstring_lines(tree: ast.AST) -> set[int]:
    """Line numbers covered by the docstrings of the module, its classes and functions."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0] if node.body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def source_lines(text: str) -> int:
    """How many lines of `text` (Python source) hold code other than docstrings."""
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in NOT_CODE:
            code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstring_lines(ast.parse(text)))


def count_file(path: Path, root: Path) -> LineCount:
    """The line counts of one file, named relative to `root`."""
    text = path.read_text()
    return LineCount(str(path.relative_to(root)), len(text.splitlines()), source_lines(text))


def count_package(package: Path) -> list[LineCount]:
    """The line counts of every module of `package`, recursively, sorted by name."""
    return [count_file(p, package.parent) for p in sorted(package.rglob("*.py"))]


def total(name: str, counts: Sequence[LineCount]) -> LineCount:
    """The sum of `counts` under `name`."""
    return LineCount(name, sum(c.lines for c in counts), sum(c.source_lines for c in counts))


def is_core(count: LineCount) -> bool:
    """Whether a module belongs to the loading core (the tools and the CLI do not)."""
    return Path(count.module).name not in CORE_EXCLUDED


def markdown(counts: Sequence[LineCount]) -> str:
    """A Markdown table of `counts` with the core and overall totals, then the old loader's."""
    core = total(
        f"**loading core** (all but save, check, migrate and the CLI; aim <= {CORE_TARGET})",
        [c for c in counts if is_core(c)],
    )
    rows = [
        *counts,
        core,
        total("**wmtp/ total**", counts),
        *OLD_LOADER,
        total("**old loader total**", OLD_LOADER),
    ]
    out = ["| module | lines | source lines |", "| --- | ---: | ---: |"]
    out += [f"| {c.module} | {c.lines:,} | {c.source_lines:,} |" for c in rows]
    return "\n".join(out)


def main() -> None:
    """Print the table for the repository's `wmtp/`."""
    print(markdown(count_package(Path(__file__).resolve().parent.parent / "wmtp")))


if __name__ == "__main__":
    main()
