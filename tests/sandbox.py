"""Run a case (a top-level function and its arguments) in a long-lived child process with a
deadline: a hostile input may hang a loader (a FIFO, a catastrophic regex), crash it or eat
the machine's memory, and the caller must still get an answer and go on. A forkserver
imports torch, transformers and wmtp once, so a case costs milliseconds and a child killed at
its deadline is replaced by a fork, not a fresh interpreter.

    outcome = sandbox.run(wmtp.load, "models/mtp", deadline=20, naming=("models/mtp",))
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple

import msgspec

Kind = Literal["ok", "wmtp_error", "other_exception", "hang"]
# transformers.modeling_utils alone takes ~3 s: a child restarted after a hang must not pay it.
PRELOAD: Final = "torch transformers.modeling_utils safetensors.torch wmtp.check wmtp.cli".split()
MEMORY: Final = 4 << 30  # address space a case may add: an absurd config fails, not the machine


class Outcome(msgspec.Struct, frozen=True):
    """How a case ended: the exception's `type` and `message` (first line), whether it (or the
    result) holds one of the caller's `naming` strings, the innermost wmtp frame that raised
    (`where`), and what the case returned (`result`, as builtins)."""

    kind: Kind
    type: str = ""
    message: str = ""
    named: bool = False
    where: str = ""
    result: Any = None


class Worker(NamedTuple):
    """The child and the parent's end of its pipe."""

    process: BaseProcess
    conn: Connection


_WORKER: list[Worker] = []  # the live child, if any; started on first use


def run(
    case: Callable[..., Any], *args: Any, deadline: float = 20.0, naming: Sequence[str] = ()
) -> Outcome:
    """`case(*args)` in the child; past `deadline` seconds the child is killed (a "hang")."""
    if not _WORKER or not _WORKER[0].process.is_alive():
        stop()
        _WORKER.append(_start())
    conn = _WORKER[0].conn
    try:
        conn.send((case, args))
        if not conn.poll(deadline):
            stop()
            return Outcome("hang", message=f"no answer in {deadline:g} s")
        kind, name, message, where, result = conn.recv()
    except (EOFError, OSError):  # the child died: a crash, or killed for memory
        _WORKER[0].process.join(5)
        code = _WORKER[0].process.exitcode
        stop()
        return Outcome("other_exception", "ChildDied", f"the child died (exit code {code})")
    text = message if kind != "ok" else str(result)
    named = any(s and s in text for s in naming)
    return Outcome(kind, name, message.partition("\n")[0][:500], named, where, result)


def stop() -> None:
    """Kill the child; the next case starts a fresh one."""
    while _WORKER:
        worker = _WORKER.pop()
        worker.process.kill()
        worker.process.join()
        worker.conn.close()


def _start() -> Worker:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(child,), daemon=True, name="wmtp-sandbox")
    process.start()
    child.close()
    return Worker(process, parent)


def _serve(conn: Connection) -> None:
    """The child: answer each case with (kind, type name, message, where, result)."""
    import wmtp

    with contextlib.suppress(OSError, ValueError):  # where there is no /proc: no limit
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (pages * os.sysconf("SC_PAGE_SIZE") + MEMORY, hard))
    home = str(Path(wmtp.__file__).parent)
    while True:
        try:
            case, args = conn.recv()
        except EOFError:
            return
        try:
            reply = ("ok", "", "", "", _plain(case(*args)))
        except BaseException as e:  # SystemExit and obstore's PanicException are outcomes too
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if f.filename.startswith(home)] or frames[-1:]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
            kind = "wmtp_error" if isinstance(e, wmtp.WmtpError) else "other_exception"
            reply = (kind, type(e).__name__, str(e) or repr(e), where, None)
        conn.send(reply)


def _plain(value: Any) -> Any:
    """`value` as builtins (a model would not unpickle in the parent), else its repr."""
    try:
        return msgspec.to_builtins(value)
    except TypeError:
        return repr(value)[:1000]
