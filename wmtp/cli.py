"""The `wmtp` command. Exit codes: 0 fine, 1 a problem was found, 2 bad usage.

Each subcommand is an entry of `COMMANDS`: its summary, an example, a function
that declares its arguments and one that runs it and returns a result dict
(printed as text, or as one JSON object with --json) and whether it found a
problem. torch and transformers are imported only by commands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec

from wmtp.errors import WmtpError

EXIT_CODES: Final = "exit codes: 0 fine, 1 problem found, 2 bad usage"
Result = tuple[dict[str, Any], bool]  # what to print, and whether a problem was found


class UsageError(WmtpError, ValueError):
    """A command-line argument is malformed (exit code 2)."""


class Command(msgspec.Struct, frozen=True):
    """One subcommand of `wmtp`."""

    summary: str
    example: str
    declare: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Result]


def _location(p: argparse.ArgumentParser) -> None:
    p.add_argument("location", help="model folder or URL (s3://bucket/prefix, gs://, az://, ...)")
    p.add_argument(
        "-o",
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="obstore option for remote locations (wins over the environment), e.g. "
        "-o endpoint=http://127.0.0.1:9000 -o allow_http=true",
    )


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true", help="run a remote model's own module")
    p.add_argument("--cache-dir", help="where remote files are cached (default ~/.cache/wmtp)")


def _storage_options(args: argparse.Namespace) -> dict[str, str] | None:
    pairs = [item.partition("=") for item in args.storage_option]
    if bad := [key for key, eq, _ in pairs if not eq]:
        raise UsageError(f"--storage-option {bad[0]!r} is not KEY=VALUE")
    return {key: value for key, _, value in pairs} or None


def _model_args(p: argparse.ArgumentParser) -> None:
    """What `load` and `check` share: where, trust, cast and config overrides."""
    _location(p)
    _trust(p)
    p.add_argument("--dtype", help="cast floating weights, e.g. bf16, fp16, fp32")
    p.add_argument(
        "--quantize",
        metavar="KIND",
        help="quantise the linear layers with bitsandbytes: int8, nf4 or fp4 "
        '(pip install "wmtp[quant]")',
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="set a config.json setting before the model is built (repeatable), e.g. "
        "--set output_hidden_states=true",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            raise UsageError(
                f"--set {item!r} is not KEY=JSON, e.g. n_layer=2 or name='\"x\"'"
            ) from None
    return overrides


def _load_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--device", help="place the model: cpu, cuda, cuda:1, mps, auto")
    p.add_argument("--verify", action="store_true", help="hash local files against the manifest")


def _load(args: argparse.Namespace) -> Result:
    import torch  # before the clock: importing libraries is not loading

    import wmtp

    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = wmtp.load(
        args.location,
        dtype=args.dtype,
        device=args.device,
        storage_options=_storage_options(args),
        trust_code=args.trust_code,
        cache_dir=args.cache_dir,
        verify=args.verify,
        config_overrides=_overrides(args),
        quantization=args.quantize,
        timings=timings,
    )
    seconds = time.perf_counter() - start
    meta = wmtp.read_metadata(args.location, storage_options=_storage_options(args))
    params = list(model.parameters())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in params}
    return {
        "location": args.location,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in params),
        "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "device": sorted({str(p.device) for p in params}),
        "files": list(meta.loading_strategy.required_files),
        "weight_bytes": sum(storages.values()),
        "seconds": round(seconds, 4),
        "phases": {name: round(s, 4) for name, s in timings.items()},
        "torch": torch.__version__,
        **({"quantization": args.quantize} if args.quantize else {}),
    }, False


def _inspect(args: argparse.Namespace) -> Result:
    from wmtp.check import inspect_model

    return _plain(inspect_model(args.location, storage_options=_storage_options(args))), False


def _resolve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("algo", help="training algorithm, e.g. critic-wmtp")
    p.add_argument("locations", nargs="+", help="candidate model folders or URLs, in order")
    p.add_argument(
        "--role",
        action="append",
        help="find this wmtp_type (repeatable) instead of the algorithm's roles in "
        "wmtp.ALGORITHM_ROLES, e.g. reward_model",
    )
    p.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE")


def _resolve(args: argparse.Namespace) -> Result:
    from wmtp.explain import why_not
    from wmtp.load import read_all
    from wmtp.roles import choose_roles, roles_of

    options, needed = _storage_options(args), roles_of(args.algo, args.role)
    found = dict(read_all(args.locations, options))  # all read: the others' reasons are printed
    chosen = choose_roles(args.algo, needed, found.items())
    later = "also serves it, but comes later in the order"
    return {
        "algo": args.algo,
        "roles": {
            role: {
                "location": path,
                "passed_over": {
                    other: why_not(meta, args.algo, role) or later
                    for other, meta in found.items()
                    if other != path
                },
            }
            for role, path in chosen.items()
        },
    }, False


def _check_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--verify-hashes", action="store_true", help="hash files against the manifest")


def _check(args: argparse.Namespace) -> Result:
    from wmtp.check import check

    report = check(
        args.location,
        storage_options=_storage_options(args),
        trust_code=args.trust_code,
        verify_hashes=args.verify_hashes,
        cache_dir=args.cache_dir,
        dtype=args.dtype,
        config_overrides=_overrides(args),
        quantization=args.quantize,
    )
    return _plain(report), bool(report.problems)


def _migrate_args(p: argparse.ArgumentParser) -> None:
    _location(p)
    p.add_argument("--write", action="store_true", help="write it (the old file is kept as a .bak)")
    p.add_argument("--role", help="wmtp_type, when the old metadata does not say it")
    p.add_argument(
        "--algorithm",
        action="append",
        default=[],
        help="an algorithm it serves (repeatable); added to algorithm_compatibility",
    )
    p.add_argument("--trust-code", action="store_true", help="import a remote folder's module")


def _migrate(args: argparse.Namespace) -> Result:
    from wmtp.migrate import migrate, migration_diff, write_migration

    options = _storage_options(args)
    migration = migrate(
        args.location,
        wmtp_type=args.role,
        algorithms=args.algorithm,
        storage_options=options,
        trust_code=args.trust_code,
    )
    written = write_migration(migration, storage_options=options) if args.write else None
    return {
        "location": args.location,
        "diff": migration_diff(migration),
        "notes": list(migration.notes),
        "written": args.write,
        "backup": written or None,
    }, False


def _export_args(p: argparse.ArgumentParser) -> None:
    _location(p)
    p.add_argument("dest", help="the model folder (or URL) to write")
    p.add_argument("--like", required=True, help="the model folder the checkpoint trained")
    p.add_argument("--dtype", help="cast floating weights, e.g. bf16, fp16, fp32")


def _export(args: argparse.Namespace) -> Result:
    from wmtp.checkpoint import export_checkpoint

    start = time.perf_counter()
    options = _storage_options(args)
    export_checkpoint(
        args.location, args.dest, like=args.like, dtype=args.dtype, storage_options=options
    )
    meta = msgspec.json.decode(msgspec.json.encode(_read_meta(args.dest, options)))
    return {
        "checkpoint": args.location,
        "dest": args.dest,
        "like": args.like,
        "files": meta["files"],
        "seconds": round(time.perf_counter() - start, 4),
    }, False


def _read_meta(location: str, options: dict[str, str] | None) -> Any:
    from wmtp.store import read_metadata

    return read_metadata(location, storage_options=options)


COMMANDS: Final[Mapping[str, Command]] = {
    "load": Command(
        "load a model; print its class, size, dtype, files and time per phase",
        "wmtp load examples/tiny-mtp --dtype bf16",
        _load_args,
        _load,
    ),
    "inspect": Command(
        "show metadata, required files with sizes and tensor counts (reads no weights)",
        "wmtp inspect s3://models/distilgpt2-mtp -o endpoint=http://127.0.0.1:9000",
        _location,
        _inspect,
    ),
    "resolve": Command(
        "pick, for each role an algorithm needs, the first candidate whose metadata serves it, "
        "and say why not the others",
        "wmtp resolve critic-wmtp ./models/mtp ./models/rm ./models/ref",
        _resolve_args,
        _resolve,
    ),
    "check": Command(
        "dry-run a load without reading weights; report every problem with its fix",
        "wmtp check ./models/distilgpt2-mtp --verify-hashes",
        _check_args,
        _check,
    ),
    "migrate": Command(
        "propose v2 metadata (with a manifest) for an old or plain Hugging Face folder",
        "wmtp migrate ./old/distilgpt2 --algorithm rho1-wmtp --write",
        _migrate_args,
        _migrate,
    ),
    "export": Command(
        "write a training checkpoint's weights as a model folder that wmtp load reads "
        "(config, module, tokenizer and metadata from --like), tensor by tensor",
        "wmtp export ckpt/step-000300 models/mtp-trained --like models/distilgpt2-mtp",
        _export_args,
        _export,
    ),
}


def parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    top = argparse.ArgumentParser(
        prog="wmtp",
        description="Load and inspect WMTP model folders (local or remote).",
        epilog=EXIT_CODES,
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.summary,
            description=command.summary,
            epilog=f"example:\n  {command.example}\n\n{EXIT_CODES}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.declare(p)
        p.add_argument("--json", action="store_true", help="print one JSON object")
    return top


def _plain(value: Any) -> dict[str, Any]:
    """JSON-ready dicts and lists (Structs and tuples included)."""
    result: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(value))
    return result


def _text(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item and not _flat(item):
                lines += [f"{pad}{key}:", *_text(item, indent + 2)]
            else:
                lines.append(f"{pad}{key}: {_flat(item) if _flat(item) is not None else item}")
        return lines
    if isinstance(value, list):
        return [f"{pad}- {line.lstrip()}" for item in value for line in _text(item, indent)]
    return [f"{pad}{value}"]


def _flat(item: Any) -> str | None:
    if isinstance(item, list) and all(not isinstance(i, dict | list) for i in item):
        joined = ", ".join(map(str, item)) or "none"
        return joined if "\n" not in joined and len(joined) <= 100 else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `wmtp` command; returns the exit code."""
    args = parser().parse_args(argv)
    try:
        result, problem = COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"wmtp {args.command}: {e}", file=sys.stderr)
        return 2
    except WmtpError as e:
        if args.json:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        else:
            print(f"wmtp {args.command}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    elif "diff" in result:  # a diff reads best as itself
        print(result["diff"], end="")
        print("".join(f"note: {n}\n" for n in result["notes"]), end="")
        kept = f"old file kept at {result['backup']}" if result["backup"] else "no old file"
        print(f"written ({kept})" if result["written"] else "not written: run again with --write")
    else:
        print("\n".join(_text(result)))
    return 1 if problem else 0


def console() -> int:
    """The console script: `main`, quiet when the reader of stdout goes away (`| head`)."""
    try:
        return main()
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(console())
