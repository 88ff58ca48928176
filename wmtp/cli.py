"""The `wmtp` command. Exit codes: 0 fine, 1 a problem was found, 2 bad usage.

Each subcommand is a pair in `COMMANDS`: a function that declares its
arguments and one that runs it and returns the exit code. torch and
transformers are imported only by the commands that load a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from wmtp.errors import WmtpError

Run = Callable[[argparse.Namespace], dict[str, Any]]


class UsageError(WmtpError, ValueError):
    """A command-line argument is malformed (exit code 2)."""


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="obstore option for remote locations (wins over the environment), e.g. "
        "-o endpoint=http://127.0.0.1:9000 -o allow_http=true",
    )


def _storage_options(args: argparse.Namespace) -> dict[str, str] | None:
    pairs = [item.partition("=") for item in args.storage_option]
    if bad := [key for key, eq, _ in pairs if not eq]:
        raise UsageError(f"--storage-option {bad[0]!r} is not KEY=VALUE")
    return {key: value for key, _, value in pairs} or None


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("location", help="model folder or URL (s3://bucket/prefix, ...)")
    p.add_argument("--dtype", help="cast floating weights, e.g. bf16, fp16, fp32")
    p.add_argument("--device", help="place the model, e.g. cpu, cuda:0")
    p.add_argument("--trust-code", action="store_true", help="run a remote model's own module")
    p.add_argument("--cache-dir", help="where remote files are cached (default ~/.cache/wmtp)")
    _store_args(p)


def _load(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # before the clock: library import is not loading

    import wmtp

    start = time.perf_counter()
    model = wmtp.load(
        args.location,
        dtype=args.dtype,
        device=args.device,
        storage_options=_storage_options(args),
        trust_code=args.trust_code,
        cache_dir=args.cache_dir,
    )
    seconds = time.perf_counter() - start
    params = list(model.parameters())
    return {
        "location": args.location,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in params),
        "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "device": sorted({str(p.device) for p in params}),
        "bytes": sum(p.numel() * p.element_size() for p in params),
        "seconds": round(seconds, 4),
        "torch": torch.__version__,
    }


def _resolve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("algo", help="training algorithm, e.g. critic-wmtp")
    p.add_argument("locations", nargs="+", help="candidate model folders or URLs, in order")
    p.add_argument("--role", help="also require this wmtp_type, e.g. reward_model")
    _store_args(p)


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    import wmtp

    options = _storage_options(args)
    chosen = wmtp.resolve(args.algo, args.locations, role=args.role, storage_options=options)
    return {"algo": args.algo, "location": chosen}


COMMANDS: Final[Mapping[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Run]]] = {
    "load": (
        "load a model and say what was loaded",
        "wmtp load examples/tiny-mtp --dtype bf16",
        _load_args,
        _load,
    ),
    "resolve": (
        "pick the first candidate whose metadata serves an algorithm",
        "wmtp resolve critic-wmtp s3://models/mtp ./models/rm --role reward_model",
        _resolve_args,
        _resolve,
    ),
}


def parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    top = argparse.ArgumentParser(
        prog="wmtp",
        description="Load and inspect WMTP model folders (local or remote).",
        epilog="exit codes: 0 fine, 1 problem found, 2 bad usage",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, example, declare, _) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example: {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        declare(p)
        p.add_argument("--json", action="store_true", help="print one JSON object")
    return top


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key:>11}: {shown}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `wmtp` command; returns the exit code."""
    args = parser().parse_args(argv)
    run = COMMANDS[args.command][3]
    try:
        result = run(args)
    except UsageError as e:
        print(f"wmtp {args.command}: {e}", file=sys.stderr)
        return 2
    except WmtpError as e:
        if args.json:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        else:
            print(f"wmtp {args.command}: {e}", file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
