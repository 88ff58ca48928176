"""Lines of wmtp's loading core, found by import: `python -m benchmarks.lines [--check]`.

The core is what loading and resolving use: a fresh interpreter imports wmtp, loads
`examples/tiny-mtp`, resolves `baseline-mtp` over it, and every `wmtp` module then in
`sys.modules` counts, except the tools built on the loader (save, check, migrate, the CLI).
Lines are physical lines, docstrings and comments included; source lines are those holding
a token of code other than a docstring. `--check` exits 1 when the core passes 973 lines.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tokenize
from collections.abc import Sequence
from typing import Final

import msgspec

from benchmarks.harness import REPO, child_env, table

CORE_LIMIT: Final = 973
CORE_AIM: Final = 800
TOOLS: Final = frozenset(
    {"wmtp.save", "wmtp.check", "wmtp.migrate", "wmtp.cli", "wmtp.__main__", "wmtp.gather"}
)
# A training run's helpers, imported on first use of `wmtp.load_roles`, `resolve_roles`,
# `ALGORITHM_ROLES`, `load_tokenizer` or the checkpoint calls (never by `load` or `resolve`):
# counted apart.
TRAINING: Final = frozenset(
    {"wmtp.roles", "wmtp.tokenizer", "wmtp.checkpoint", "wmtp.dcp", "wmtp.export"}
)
PROBE: Final = """
import json, sys, wmtp
wmtp.load("examples/tiny-mtp")
wmtp.resolve("baseline-mtp", ["examples/tiny-mtp"])
print(json.dumps([n for n in sys.modules if n == "wmtp" or n.startswith("wmtp.")]))
"""
# Tokens of no code: a line with only these (or a docstring) is no source line.
NOT_CODE: Final = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING}
NOT_CODE.update({tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER})


class LineCount(msgspec.Struct, frozen=True):
    """Physical lines and source lines of one module (or a total)."""

    module: str
    lines: int
    source_lines: int


# The old loader, from the public repository wooshikwon/wmtp at commit 12fff5d (issue 4).
OLD_LOADER: Final = (
    LineCount("src/components/loader/standardized_model_loader.py", 529, 267),
    LineCount("src/utils/path_resolver.py", 155, 42),
    LineCount("src/utils/s3.py", 381, 169),
    LineCount("src/utils/optimized_s3_transfer.py", 325, 217),
)


def source_lines(text: str) -> int:
    """How many lines of `text` hold code other than docstrings."""
    code: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in NOT_CODE:
            code.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and ast.get_docstring(node, clean=False) is not None:
                code -= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return len(code)


def count(module: str) -> LineCount:
    """The counts of a `wmtp` module, from its file in the repository."""
    path = REPO.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    text = path.read_text()
    return LineCount(module, len(text.splitlines()), source_lines(text))


def imported() -> list[str]:
    """The `wmtp` modules a fresh interpreter imports to load and resolve a model."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=child_env(), capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the import probe failed: {done.stderr.strip()[-2000:]}")
    names: list[str] = json.loads(done.stdout.splitlines()[-1])
    return sorted(names)


def counts() -> tuple[list[LineCount], list[LineCount]]:
    """The core modules' counts and the other `wmtp` modules' counts."""
    core = [n for n in imported() if n not in TOOLS]
    files = sorted((REPO / "wmtp").rglob("*.py"))
    every = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in files]
    every = [n.removesuffix(".__init__") for n in every]
    return [count(n) for n in core], [count(n) for n in every if n not in core]


def total(name: str, rows: Sequence[LineCount]) -> LineCount:
    """The sum of `rows` under `name`."""
    return LineCount(name, sum(r.lines for r in rows), sum(r.source_lines for r in rows))


def markdown(core: Sequence[LineCount], others: Sequence[LineCount]) -> str:
    """The core modules and their total against the limit, the modules `load` imports only
    when needed, a training run's helpers, the tools, and the old loader."""
    on_demand = [r for r in others if r.module not in TOOLS | TRAINING]
    training = [r for r in others if r.module in TRAINING]
    tools = [r for r in others if r.module in TOOLS]
    rows = [
        *core,
        total(f"**loading core** (limit {CORE_LIMIT}, aim ~{CORE_AIM})", core),
        *on_demand,
        total(
            "**imported by load when needed** "
            "(remote, failing load, parallelize, quantization, train)",
            on_demand,
        ),
        total("**everything load and resolve can import**", [*core, *on_demand]),
        *training,
        total("**a training run's helpers** (roles, tokenizer, checkpoints)", training),
        *tools,
        total("**tools and CLI**", tools),
        *OLD_LOADER,
        total("**old loader**", OLD_LOADER),
    ]
    return table(
        ["module", "lines", "source lines"],
        [(r.module, f"{r.lines:,}", f"{r.source_lines:,}") for r in rows],
        left=1,
    )


def main(argv: Sequence[str]) -> int:
    """Print the table; with `--check`, 1 when the core is over the limit."""
    core, others = counts()
    print(markdown(core, others))
    lines = total("core", core).lines
    if lines > CORE_LIMIT:
        print(f"loading core: {lines} lines > {CORE_LIMIT}", file=sys.stderr)
    return int(lines > CORE_LIMIT and "--check" in argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
