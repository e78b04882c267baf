"""The IPython extension: ``%load_ext nbq``, ``%nbq ...`` and ``%%remote``.

``%%remote`` runs a cell on a worker with ``client.submit`` and a plain function
(remotecell.py's ``remote_cell``), so no new message kinds exist for it:

- the cell is parsed here (a syntax error never leaves the kernel); an AST
  pass (cellnames.py) finds the names it reads and assigns;
- read names that exist in the user namespace are pickled one by one (an
  unpicklable one fails the cell before anything is sent, naming it); modules
  travel by name and are imported on the worker; imports in the cell re-run
  there;
- the worker runs the cell with its output captured and returns the outputs,
  the assigned names and the traceback of an exception (remotecell.py);
- here the outputs are written in order, as they stream in from the worker,
  wherever it runs (output.py), the names are bound, and a remote exception is
  raised as ``RemoteCellError`` so the cell fails (a following cell of "run
  all" does not run).  ``--all`` and ``--bg`` write output at the end only.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import types
import uuid

import cloudpickle
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from ..errors import NbqError
from ..client.status import status_bundle
from .cellnames import analyze
from .output import OutputStream, write_events
from .remotecell import RemoteCellResult, remote_cell

#: Names of the user namespace that are never shipped (IPython's own).
NEVER_SHIP = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___",
                        "_ih", "_oh", "_dh", "__builtins__", "__name__"})
ALL_ROUNDS = 50


class RemoteCellError(NbqError):
    """A %%remote cell raised on its worker; shows the remote traceback."""

    def __init__(self, worker: str, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"{type_name}: {message} (on {worker})")
        self.worker, self.type_name, self.remote_traceback = worker, type_name, tb

    def _render_traceback_(self) -> list[str]:
        return [f"Remote traceback (worker {self.worker}):", self.remote_traceback.rstrip("\n")]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def _remote_parser() -> _Parser:
    p = _Parser(prog="%%remote", add_help=False)
    p.add_argument("--all", action="store_true", help="run once on every worker process")
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--bg", action="store_true")
    p.add_argument("--queue", default="default")
    return p


def _launch_parser() -> _Parser:
    from ..clusters.launch import add_launchers
    p = _Parser(prog="%nbq launch", add_help=False)
    add_launchers(p.add_subparsers(dest="launcher", required=True, parser_class=_Parser))
    return p


def _nbq_parser() -> _Parser:
    p = _Parser(prog="%nbq", add_help=False)
    p.add_argument("command", choices=["connect", "launch", "status", "workers", "shutdown"])
    p.add_argument("address", nargs="?", default=None)
    p.add_argument("--workers", type=int, default=None)
    return p


@magics_class
class NbqMagics(Magics):
    """%nbq connect/status/workers/shutdown and %%remote."""

    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.client = None
        self.cluster = None       # the cluster of `%nbq launch`, closed with its client
        self.last = None          # the Future of the latest %%remote cell (not --all)

    # -- the client ------------------------------------------------------------

    def _client(self):
        if self.client is not None and not self.client.closed:
            return self.client
        from ..client import current_client
        try:
            return current_client()
        except NbqError:
            raise UsageError("no nbq client: run `%nbq connect` (or create nbq.Client()) first") from None

    @line_magic
    def nbq(self, line: str):
        """%nbq connect [ADDRESS] [--workers N] | launch ssh HOST... [-n N] | status | workers
        | shutdown"""
        words = shlex.split(line)
        if words[:1] == ["launch"]:
            return self._launch(_launch_parser().parse_args(words[1:]))
        args = _nbq_parser().parse_args(words)
        if args.command == "connect":
            return self._connect(args.address, args.workers)
        if args.command == "shutdown":
            client = self._client()
            client.shutdown()
            if client is self.client:
                self.client = None
                self._close_cluster()
            print(f"nbq: shut down {client.address}")
            return None
        client = self._client()
        st = client.status()
        from IPython.display import display
        display(status_bundle(client.address, st, workers_only=args.command == "workers"), raw=True)
        return None

    def _launch(self, args):
        """%nbq launch: start a cluster, make it this extension's client's."""
        from ..client import Client
        self._drop_client()
        self.cluster = args.make(args)
        self.client = Client(self.cluster)
        from IPython.display import display
        display(self.cluster)
        return None

    def _drop_client(self) -> None:
        if self.client is not None and not self.client.closed:
            self.client.shutdown(wait=False)
        self._close_cluster()

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.close()

    def _connect(self, address: str | None, workers: int | None):
        from ..client import Client
        self._drop_client()
        self.client = Client(address, workers=workers)
        embedded = address is None and not os.environ.get("NBQ_BROKER")
        n = workers if workers is not None else (os.cpu_count() or 1) if embedded else 0
        if n:
            try:
                self.client.wait_for_workers(n, timeout=30)
            except TimeoutError:
                pass
        print(f"nbq: connected to {self.client.address}")
        return None

    # -- %%remote ----------------------------------------------------------------

    @cell_magic
    def remote(self, line: str, cell: str):
        """%%remote [--all] [--timeout S] [--bg] [--queue Q]: run this cell on a worker."""
        args = _remote_parser().parse_args(shlex.split(line))
        args.line = line
        if args.all and args.bg:
            raise UsageError("%%remote: --all and --bg cannot be combined")
        try:
            reads, assigns, imports = analyze(cell)
        except SyntaxError:
            self.shell.showsyntaxerror()
            raise UsageError("%%remote: the cell has a syntax error; nothing was sent") from None
        shipped, modules = self._pack(reads - imports, assigns)
        client = self._client()
        call = (cell, shipped, modules, sorted(assigns))
        first = {"magic_line": f"%%remote {line}".rstrip()}
        if args.all:
            results = self._run_all(client, call, args)
            return self._finish_all(results)
        if args.bg:
            fut = self.last = client.submit(remote_cell, *call, queue=args.queue, **first)
            fut.add_done_callback(self._bind_later)
            self.shell.user_ns["_"] = fut
            print(f"nbq: running in the background as {fut.id}; `_` holds the Future")
            return None
        with OutputStream() as output:
            fut = self.last = client.submit(remote_cell, *call, queue=args.queue,
                                            stream=True, **first)
            try:
                result = output.follow(fut, write_events, args.timeout)
            except KeyboardInterrupt:
                fut.cancel()
                raise
            except TimeoutError:
                cancelled = fut.cancel()
                raise UsageError(f"%%remote: no result within {args.timeout:g} s"
                                 + (" (the task was cancelled)" if cancelled else
                                    " (the task had started and keeps running)")) from None
        return self._finish(result)

    def _pack(self, reads: set[str], assigns: set[str]) -> tuple[dict, dict]:
        """Pickle the read names that exist here, one by one; modules go by name."""
        ns = self.shell.user_ns
        shipped: dict[str, bytes] = {}
        modules: dict[str, str] = {}
        from IPython.core.display_functions import display as ipython_display
        for name in sorted(reads):
            if name in NEVER_SHIP or name not in ns:
                continue
            value = ns[name]
            if value is ipython_display:
                continue
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
                continue
            try:
                shipped[name] = cloudpickle.dumps(value)
            except Exception as e:
                if name in assigns:   # the cell may well rebind it first: let the worker say
                    continue
                raise UsageError(f"%%remote: cannot send {name!r} ({type(value).__name__}) to the "
                                 f"worker, it does not pickle: {type(e).__name__}: {e}; nothing "
                                 "was sent") from None
        return shipped, modules

    def _bind(self, result: RemoteCellResult) -> None:
        self.shell.user_ns.update(result.namespace())
        for name, why in result.unpicklable.items():
            print(f"nbq: {name!r} was not brought back: {why}", file=sys.stderr)

    def _bind_later(self, fut) -> None:
        """--bg: bind the assigned names when the task finishes (from the receiver thread)."""
        try:
            result = fut.result()
        except BaseException:
            return
        if result.error is None:
            self._bind(result)

    def _finish(self, result: RemoteCellResult):
        """Fail the cell with the remote error, or bind the names (the outputs are written)."""
        if result.error is not None:
            raise RemoteCellError(result.worker, *result.error)
        self._bind(result)
        return None

    def _run_all(self, client, call: tuple, args) -> dict[str, RemoteCellResult]:
        """The cell once on every worker process serving the queue.

        There is no way to address one process, so tasks go out in rounds of one
        per process until every process has run it; a process runs the cell at most once
        (it remembers the run id) and a repeat only holds it for remotecell.ALL_HOLD s so
        the round's other tasks reach other processes.  Rounds end when every
        process the broker listed at the start has answered.
        """
        procs = {f"{w['host']}:{pid}" for w in client.workers()
                 if args.queue in w.get("queues", [args.queue]) for pid in w["processes"]}
        if not procs:
            raise UsageError(f"%%remote --all: no worker process serves queue {args.queue!r}")
        run_id = uuid.uuid4().hex
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        results: dict[str, RemoteCellResult] = {}
        for _ in range(ALL_ROUNDS):
            missing = procs - results.keys()
            if not missing:
                break
            futs = [client.submit(remote_cell, *call, run_id=run_id, queue=args.queue,
                                  magic_line=f"%%remote {args.line}".rstrip())
                    for _ in procs]   # one per process: fewer would keep finding the same idle one
            try:
                for f in futs:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    r = f.result(remaining)
                    if not r.duplicate:
                        results[r.worker] = r
            except KeyboardInterrupt:
                for f in futs:
                    f.cancel()
                raise
            except TimeoutError:
                for f in futs:
                    f.cancel()
                raise UsageError(f"%%remote --all: {len(results)} of {len(procs)} processes "
                                 f"answered within {args.timeout:g} s") from None
        missing = procs - results.keys()
        if missing:
            print(f"nbq: --all did not reach {sorted(missing)} (gone, or busy)", file=sys.stderr)
        return results

    def _finish_all(self, results: dict[str, RemoteCellResult]):
        errors = []
        for worker in sorted(results):
            r = results[worker]
            print(f"[{worker}]", flush=True)
            write_events(r.outputs)
            if r.error is not None:
                errors.append(r)
                sys.stderr.write(f"[{worker}] " + r.error[2])
        merged: dict[str, dict] = {}
        for worker, r in results.items():
            if r.error is None:
                for name, value in r.namespace().items():
                    merged.setdefault(name, {})[worker] = value
        self.shell.user_ns.update(merged)
        if errors:
            r = errors[0]
            raise RemoteCellError(r.worker, r.error[0],
                                  f"{r.error[1]} ({len(errors)} of {len(results)} processes failed)",
                                  r.error[2])
        return None


def load_ipython_extension(ipython) -> None:
    """Register the nbq magics on the shell."""
    ipython.register_magics(NbqMagics)
