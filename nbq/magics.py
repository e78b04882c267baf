"""The IPython extension: ``%load_ext nbq``, ``%nbq ...`` and ``%%remote``.

``%%remote`` runs a cell on a worker with ``client.submit`` and a plain function
(``_remote_cell``), so no new message kinds exist for it:

- the cell is parsed here (a syntax error never leaves the kernel); an AST
  pass finds the names it reads and assigns, with function, lambda, class and
  comprehension scopes handled;
- read names that exist in the user namespace are pickled one by one (an
  unpicklable one fails the cell before anything is sent, naming it); modules
  travel by name and are imported on the worker; imports in the cell re-run
  there;
- the worker runs the cell with stdout/stderr and ``display()`` captured in
  order, formats the last expression's value as a MIME bundle there (so the
  object itself need not pickle), and returns the outputs, the assigned names
  (pickled one by one) and the traceback of an exception, with the cell's own
  line numbers;
- here the outputs are replayed in order (streams to stdout/stderr, bundles
  through IPython's display publisher), the names are bound, and a remote
  exception is raised as ``RemoteCellError`` so the cell fails (a following
  cell of "run all" does not run).

Streaming: stdout/stderr and display() output reach the cell while it runs
when the worker is on this machine.  The magic binds a PULL socket on
127.0.0.1 for the cell and passes its address and a random token inside the
(signed) task; the worker pushes each output event as JSON (text and MIME
bundles only, nothing is unpickled) tagged with the token and its sequence
number, and the magic writes them as they come while it waits.  The result
still carries every event, so whatever did not stream (a worker on another
machine, which cannot reach a loopback socket, or a gap) is written when the
cell finishes, in order and without repeats.  ``--all`` and ``--bg`` write
output at the end only.
"""
from __future__ import annotations

import argparse
import ast
import base64
import builtins
import io
import os
import shlex
import socket
import sys
import time
import types
import uuid
from typing import Any

import cloudpickle
import zmq
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .status import status_bundle

#: Names of the user namespace that are never shipped (IPython's own).
NEVER_SHIP = frozenset({"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___",
                        "_ih", "_oh", "_dh", "__builtins__", "__name__"})
#: How long a task of an ``--all`` round that lands on a process that already ran
#: the cell keeps that process busy, so the other tasks of the round go elsewhere.
ALL_HOLD = 0.05
ALL_ROUNDS = 50

_RAN: set = set()        # (worker process) run ids of --all cells this process has run


# -- finding the names a cell reads and assigns ------------------------------------

class _Scope:
    def __init__(self, kind: str, parent: "_Scope | None") -> None:
        self.kind = kind            # module, function, class, comprehension
        self.parent = parent
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.declared_global: set[str] = set()
        self.imports: set[str] = set()


class _Analyzer(ast.NodeVisitor):
    """Collects, for the module scope, the names read (including free names of nested
    scopes), assigned (including ``global`` assignments in functions) and imported."""

    def __init__(self) -> None:
        self.module = _Scope("module", None)
        self.scope = self.module

    # scopes
    def _enter(self, kind: str, params: set[str] = frozenset()) -> _Scope:
        s = _Scope(kind, self.scope)
        s.stores |= set(params)
        self.scope = s
        return s

    def _leave(self, s: _Scope) -> None:
        self.scope = s.parent
        free = s.loads - (s.stores - s.declared_global)
        for name in s.stores & s.declared_global:
            self.module.stores.add(name)
        for name in free:
            (self.module if name in s.declared_global else self.scope).loads.add(name)

    def _binding_scope(self) -> _Scope:
        s = self.scope
        while s.kind == "comprehension":   # := in a comprehension binds outside it
            s = s.parent
        return s

    # names
    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self.scope.loads.add(node.id)
        else:
            self.scope.stores.add(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self.scope.loads.add(node.target.id)
        self.generic_visit(node)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._binding_scope().stores.add(node.target.id)

    def visit_Global(self, node: ast.Global) -> None:
        self.scope.declared_global.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            name = a.asname or a.name.split(".")[0]
            self.scope.stores.add(name)
            self.scope.imports.add(name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            if a.name != "*":
                self.scope.stores.add(a.asname or a.name)
                self.scope.imports.add(a.asname or a.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.scope.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node) -> None:
        if node.name:
            self.scope.stores.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node) -> None:
        if node.name:
            self.scope.stores.add(node.name)

    def visit_MatchMapping(self, node) -> None:
        if node.rest:
            self.scope.stores.add(node.rest)
        self.generic_visit(node)

    # nested scopes
    def _arguments(self, args: ast.arguments) -> set[str]:
        for d in list(args.defaults) + [d for d in args.kw_defaults if d is not None]:
            self.visit(d)
        every = args.posonlyargs + args.args + args.kwonlyargs
        every += [a for a in (args.vararg, args.kwarg) if a is not None]
        for a in every:
            if a.annotation is not None:
                self.visit(a.annotation)
        return {a.arg for a in every}

    def visit_FunctionDef(self, node) -> None:
        for d in node.decorator_list:
            self.visit(d)
        if node.returns is not None:
            self.visit(node.returns)
        params = self._arguments(node.args)
        self.scope.stores.add(node.name)
        s = self._enter("function", params)
        for stmt in node.body:
            self.visit(stmt)
        self._leave(s)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        params = self._arguments(node.args)
        s = self._enter("function", params)
        self.visit(node.body)
        self._leave(s)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for d in node.decorator_list + node.bases + [k.value for k in node.keywords]:
            self.visit(d)
        self.scope.stores.add(node.name)
        s = self._enter("class")
        for stmt in node.body:
            self.visit(stmt)
        self._leave(s)

    def _comprehension(self, node, parts: list) -> None:
        gens = node.generators
        self.visit(gens[0].iter)           # evaluated in the enclosing scope
        s = self._enter("comprehension")
        for i, g in enumerate(gens):
            self.visit(g.target)
            if i:
                self.visit(g.iter)
            for cond in g.ifs:
                self.visit(cond)
        for p in parts:
            self.visit(p)
        self._leave(s)

    def visit_ListComp(self, node) -> None:
        self._comprehension(node, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node) -> None:
        self._comprehension(node, [node.key, node.value])


def analyze(code: str) -> tuple[set[str], set[str], set[str]]:
    """(names read, names assigned, names imported) at the top level of a cell.

    Reads include the free names of functions, lambdas, classes and
    comprehensions defined in the cell; assigns include ``global`` names a
    function of the cell assigns.  Raises SyntaxError for a cell that does not parse.
    """
    a = _Analyzer()
    a.visit(ast.parse(code))
    m = a.module
    return m.loads, m.stores, m.imports


# -- the remote side -----------------------------------------------------------------

class RemoteCellResult:
    """What a remote cell produced on one worker process: outputs, names, error."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.outputs: list[tuple] = []     # ("stdout"|"stderr", text) or ("display", data, md)
        self.values: dict[str, bytes] = {}  # assigned name -> pickle
        self.modules: dict[str, str] = {}   # assigned name -> module name
        self.unpicklable: dict[str, str] = {}
        self.error: tuple[str, str, str] | None = None   # type name, message, traceback text
        self.duplicate = False             # --all: this process had already run the cell

    def namespace(self) -> dict[str, Any]:
        """The names the cell assigned, unpickled (modules imported)."""
        import importlib
        ns: dict[str, Any] = {}
        for name, mod in self.modules.items():
            try:
                ns[name] = importlib.import_module(mod)
            except ImportError:
                pass
        for name, blob in self.values.items():
            ns[name] = cloudpickle.loads(blob)
        return ns

    def replay(self, label: str | None = None, skip: int = 0) -> None:
        """Write the outputs here in their order (after the first ``skip``, already streamed)."""
        if label:
            print(label, flush=True)
        for out in self.outputs[skip:]:
            _write_event(out)
        _flush()

    def _ipython_display_(self) -> None:
        self.replay()
        if self.error:
            sys.stderr.write(self.error[2])

    def __repr__(self) -> str:
        state = f"{self.error[0]}" if self.error else "ok"
        return f"<nbq.RemoteCellResult {self.worker} {state}, names {sorted(self.values)}>"


def _write_event(out) -> None:
    """One output event here: ("stdout"|"stderr", text) or ("display", data, metadata)."""
    if out[0] == "display":
        _flush()
        from IPython.display import publish_display_data
        publish_display_data(out[1], out[2] or None)
    else:
        # left to the stream's own buffering (a kernel sends a message per flush, not
        # per write); the other stream is flushed first so stdout/stderr keep their order
        stream, other = (sys.stdout, sys.stderr) if out[0] == "stdout" else (sys.stderr, sys.stdout)
        other.flush()
        stream.write(out[1])


def _flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


class _Events:
    """The worker's side of a cell's output: every event is kept (it travels back
    with the result) and, when a stream address was given, pushed at once."""

    def __init__(self, outputs: list, stream: dict | None) -> None:
        self.outputs = outputs
        self.sock = None
        if stream and stream.get("host") == socket.gethostname():
            try:
                self.sock = zmq.Context.instance().socket(zmq.PUSH)
                self.sock.setsockopt(zmq.LINGER, 1000)
                self.sock.setsockopt(zmq.SNDHWM, 100_000)
                self.sock.connect(stream["address"])
                self.token = stream["token"]
            except zmq.ZMQError:
                self.sock = None

    def __call__(self, event: tuple) -> None:
        if event[0] == "display":   # bytes (a figure's PNG) would stop the JSON stream
            event = ("display", _text_only(event[1]), event[2])
        self.outputs.append(event)
        if self.sock is not None:
            try:
                self.sock.send_json([self.token, len(self.outputs) - 1, list(event)], zmq.NOBLOCK)
            except (zmq.ZMQError, TypeError, ValueError):
                self.close()       # the rest travels with the result

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _text_only(data: dict) -> dict:
    """A MIME bundle with bytes values (image/png) base64-encoded, Jupyter's form for them."""
    return {k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
            for k, v in data.items()}


class _Capture(io.TextIOBase):
    """A text stream passing each write as an event, so stdout/stderr keep their order."""

    def __init__(self, name: str, emit: _Events) -> None:
        self.name = name
        self.emit = emit

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if s:
            self.emit((self.name, s))
        return len(s)


def _format(value: Any) -> tuple[dict, dict]:
    """The MIME bundle IPython would show for value; a matplotlib Figure gets a PNG
    (as the inline backend gives it), found by name so matplotlib is never imported here."""
    from IPython.core.formatters import DisplayFormatter
    fmt = DisplayFormatter()

    def png(fig):
        from IPython.core.pylabtools import print_figure
        return print_figure(fig, "png")
    fmt.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", png)
    data, md = fmt.format(value)
    return data, md


def _remote_cell(code: str, shipped: dict[str, bytes], modules: dict[str, str],
                 assigns: list[str], run_id: str | None = None,
                 magic_line: str | None = None, stream: dict | None = None) -> RemoteCellResult:
    """Runs on a worker: the cell in a fresh namespace, capturing what it prints and displays.

    With magic_line (the cell's ``%%remote ...`` line), line numbers in a
    traceback are those the user sees in the notebook cell.
    """
    import importlib
    import linecache
    import traceback
    worker = f"{socket.gethostname()}:{os.getpid()}"
    result = RemoteCellResult(worker)
    if run_id is not None:                 # --all: at most once per process
        if run_id in _RAN:
            time.sleep(ALL_HOLD)
            result.duplicate = True
            return result
        _RAN.add(run_id)
    filename = f"<remote-cell {uuid.uuid4().hex[:8]}>"
    if magic_line is not None:
        code = magic_line.rstrip("\n") + "\n" + code
    lines = code.splitlines(True)
    linecache.cache[filename] = (len(code), None, lines, filename)
    ns: dict[str, Any] = {"__name__": "__nbq_remote__", "__builtins__": builtins}
    emit = _Events(result.outputs, stream)

    def display(*objs: Any, raw: bool = False, **kw: Any) -> None:
        for obj in objs:
            if raw and isinstance(obj, dict):
                emit(("display", obj, {}))
            else:
                emit(("display", *_format(obj)))

    import IPython.core.display_functions as dispfn
    import IPython.display as ipdisplay
    saved = (sys.stdout, sys.stderr, dispfn.display, ipdisplay.display)
    sys.stdout, sys.stderr = _Capture("stdout", emit), _Capture("stderr", emit)
    dispfn.display = ipdisplay.display = display
    try:
        for name, mod in modules.items():
            ns[name] = importlib.import_module(mod)
        for name, blob in shipped.items():
            ns[name] = cloudpickle.loads(blob)
        ns.setdefault("display", display)
        tree = ast.parse(code if magic_line is None else "\n" + "".join(lines[1:]), filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), ns)
        if last is not None:
            value = eval(compile(last, filename, "eval"), ns)
            if value is not None:
                emit(("display", *_format(value)))
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next                 # start at the cell's own frames
        text = "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))
        result.error = (type(e).__name__, str(e), text)
    finally:
        sys.stdout, sys.stderr, dispfn.display, ipdisplay.display = saved
        emit.close()
    for name in assigns:
        if name not in ns:
            continue
        value = ns[name]
        if isinstance(value, types.ModuleType):
            result.modules[name] = value.__name__
            continue
        try:
            result.values[name] = cloudpickle.dumps(value)
        except Exception as e:
            result.unpicklable[name] = f"{type(value).__name__}: {type(e).__name__}: {e}"
    return result


# -- the local side --------------------------------------------------------------------

class RemoteCellError(Exception):
    """A %%remote cell raised on its worker; shows the remote traceback."""

    def __init__(self, worker: str, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"{type_name}: {message} (on {worker})")
        self.worker, self.type_name, self.remote_traceback = worker, type_name, tb

    def _render_traceback_(self) -> list[str]:
        return [f"Remote traceback (worker {self.worker}):", self.remote_traceback.rstrip("\n")]


class _StreamReader:
    """The kernel's side of output streaming for one cell (see the module docstring)."""

    POLL_MS = 50

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.token = uuid.uuid4().hex
        self.spec = {"address": f"tcp://127.0.0.1:{port}", "token": self.token,
                     "host": socket.gethostname()}
        self.shown = 0            # events written here, in order, from the stream
        self.gap = False          # one went missing: the rest is written from the result

    def __enter__(self) -> "_StreamReader":
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _drain(self, timeout_ms: int) -> None:
        while self.sock.poll(timeout_ms):
            timeout_ms = 0
            try:
                token, seq, event = self.sock.recv_json(zmq.NOBLOCK)
            except (zmq.ZMQError, ValueError, TypeError):
                continue
            if token != self.token or self.gap:
                continue
            if seq != self.shown:
                self.gap = True
                continue
            _write_event(event)
            self.shown += 1
        _flush()

    def wait(self, fut, timeout: float | None) -> RemoteCellResult:
        """The cell's result, writing its output events as they arrive meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not fut.done():
            fut._await(0)  # BrokerUnavailable once the client has given up on its broker
            wait_ms = self.POLL_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            self._drain(wait_ms)
        self._drain(0)
        return fut.result()


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
    from .clusters.launch import add_launchers
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
        if self.client is not None and not self.client._closed:
            return self.client
        from .client import current_client
        from .errors import NbqError
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
        from .client import Client
        self._drop_client()
        self.cluster = args.make(args)
        self.client = Client(self.cluster)
        from IPython.display import display
        display(self.cluster)
        return None

    def _drop_client(self) -> None:
        if self.client is not None and not self.client._closed:
            self.client.shutdown(wait=False)
        self._close_cluster()

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.close()

    def _connect(self, address: str | None, workers: int | None):
        from .client import Client
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
            fut = self.last = client.submit(_remote_cell, *call, queue=args.queue, **first)
            fut.add_done_callback(self._bind_later)
            self.shell.user_ns["_"] = fut
            print(f"nbq: running in the background as {fut.id}; `_` holds the Future")
            return None
        with _StreamReader() as reader:
            fut = self.last = client.submit(_remote_cell, *call, queue=args.queue,
                                            stream=reader.spec, **first)
            try:
                result = reader.wait(fut, args.timeout)
            except KeyboardInterrupt:
                fut.cancel()
                raise
            except TimeoutError:
                cancelled = fut.cancel()
                raise UsageError(f"%%remote: no result within {args.timeout:g} s"
                                 + (" (the task was cancelled)" if cancelled else
                                    " (the task had started and keeps running)")) from None
        return self._finish(result, skip=reader.shown)

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

    def _finish(self, result: RemoteCellResult, skip: int = 0):
        result.replay(skip=skip)
        if result.error is not None:
            raise RemoteCellError(result.worker, *result.error)
        self._bind(result)
        return None

    def _run_all(self, client, call: tuple, args) -> dict[str, RemoteCellResult]:
        """The cell once on every worker process serving the queue.

        There is no way to address one process, so tasks go out in rounds of one
        per process until every process has run it; a process runs the cell at most once
        (it remembers the run id) and a repeat only holds it for ALL_HOLD s so
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
            futs = [client.submit(_remote_cell, *call, run_id=run_id, queue=args.queue,
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
            r.replay(label=f"[{worker}]")
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
