"""What a worker runs for a ``%%remote`` cell: the cell in a fresh namespace, output captured.

``remote_cell`` is a plain function the magic submits like any task, so no
message kinds exist for it.  The worker unpickles it by reference to this
module, which imports neither IPython nor the magics: a worker loads IPython
only if the cell may reach IPython's own ``display()`` (IPython is loaded in
the process already, the cell imports it, or a shipped name refers to it), or
to format a displayed value as IPython would; without IPython, a value shows
as its ``repr``.

The cell's stdout/stderr and ``display()`` calls become output events, in
order: ``("stdout"|"stderr", text)`` or ``("display", data, metadata)``.
Every event travels back in the RemoteCellResult; when the magic asks for a
stream, they also go to the client as they happen, through the worker's
transport (TaskContext.output), from any machine (see output.py).  The assigned names come back pickled one by one, and an
exception as its type name, message and traceback with the cell's own line
numbers.
"""
from __future__ import annotations

import ast
import base64
import builtins
import io
import json
import os
import socket
import sys
import threading
import time
import types
import uuid
from typing import Any, Callable

import cloudpickle

from ..worker import context

#: How long a task of an ``--all`` round that lands on a process that already ran
#: the cell keeps that process busy, so the other tasks of the round go elsewhere.
ALL_HOLD = 0.05

_RAN: set = set()        # run ids of the --all cells this worker process has run


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

    def _ipython_display_(self) -> None:
        """Shown in a kernel (a ``--bg`` cell's result): the outputs, then the traceback."""
        from .output import write_events
        write_events(self.outputs)
        if self.error:
            sys.stderr.write(self.error[2])

    def __repr__(self) -> str:
        state = f"{self.error[0]}" if self.error else "ok"
        return f"<nbq.RemoteCellResult {self.worker} {state}, names {sorted(self.values)}>"


class _Events:
    """The worker's side of a cell's output: every event is kept (it travels back with
    the result) and, when streaming, sent on through the worker's transport
    (TaskContext.output) in batches at most every FLUSH_EVERY seconds, by a thread of
    its own so a cell that prints and then computes for long still shows its output."""

    FLUSH_EVERY = 0.05

    def __init__(self, outputs: list, send: Callable[[list], None] | None) -> None:
        self.outputs = outputs
        self.send = send
        self.sent = 0                   # events sent on so far
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = None
        if send is not None:
            self._flusher = threading.Thread(target=self._run, name="nbq-cell-output", daemon=True)
            self._flusher.start()

    def __call__(self, event: tuple) -> None:
        if event[0] == "display":   # bytes (a figure's PNG) would stop the JSON stream
            event = ("display", _text_only(event[1]), event[2])
        with self._lock:
            self.outputs.append(event)

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_EVERY):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            start, events = self.sent, self.outputs[self.sent:]
            self.sent = len(self.outputs)
        if events:
            try:
                self.send([json.dumps([start, [list(e) for e in events]]).encode()])
            except (TypeError, ValueError):
                self.send = None        # the rest travels with the result only
                self._stop.set()
            except Exception:
                self._stop.set()

    def close(self) -> None:
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
            if self.send is not None:
                self._flush()


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
    (as the inline backend gives it), found by name so matplotlib is never imported here.
    Without IPython installed, the value's repr."""
    try:
        from IPython.core.formatters import DisplayFormatter
    except ImportError:
        return {"text/plain": repr(value)}, {}
    fmt = DisplayFormatter()

    def png(fig):
        from IPython.core.pylabtools import print_figure
        return print_figure(fig, "png")
    fmt.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", png)
    data, md = fmt.format(value)
    return data, md


def _may_use_ipython(tree: ast.Module, modules: dict[str, str], shipped: dict[str, bytes]) -> bool:
    """Whether the cell may call IPython's own display(): IPython is loaded here already,
    the cell imports it, or a shipped name refers to it (a pickle names the modules it needs)."""
    if "IPython" in sys.modules:
        return True
    if any(m.split(".")[0] == "IPython" for m in modules.values()):
        return True
    if any(b"IPython" in blob for blob in shipped.values()):
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "IPython"
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "IPython":
            return True
    return False


def _divert_ipython_display(display: Callable) -> Callable[[], None]:
    """Make IPython's display() the cell's until the returned function is called."""
    try:
        import IPython.core.display_functions as dispfn
        import IPython.display as ipdisplay
    except ImportError:
        return lambda: None
    saved = dispfn.display, ipdisplay.display
    dispfn.display = ipdisplay.display = display

    def restore() -> None:
        dispfn.display, ipdisplay.display = saved
    return restore


def remote_cell(code: str, shipped: dict[str, bytes], modules: dict[str, str],
                assigns: list[str], run_id: str | None = None,
                magic_line: str | None = None, stream: bool = False) -> RemoteCellResult:
    """Runs on a worker: the cell in a fresh namespace, capturing what it prints and displays.

    shipped holds the pickled names it reads, modules the read names that are
    modules (imported here), assigns the names to bring back.  With run_id
    (``--all``), a process runs the cell at most once.  With magic_line (the
    cell's ``%%remote ...`` line), line numbers in a traceback are those the
    user sees in the notebook cell.  With stream, output events also go to
    the client as they happen, through the worker's transport (output.py).
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
    ctx = context.current() if stream else None
    emit = _Events(result.outputs, ctx.output if ctx is not None else None)

    def display(*objs: Any, raw: bool = False, **kw: Any) -> None:
        for obj in objs:
            if raw and isinstance(obj, dict):
                emit(("display", obj, {}))
            else:
                emit(("display", *_format(obj)))

    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Capture("stdout", emit), _Capture("stderr", emit)
    restore_display = None
    try:
        tree = ast.parse(code if magic_line is None else "\n" + "".join(lines[1:]), filename)
        if _may_use_ipython(tree, modules, shipped):
            restore_display = _divert_ipython_display(display)
        for name, mod in modules.items():
            ns[name] = importlib.import_module(mod)
        for name, blob in shipped.items():
            ns[name] = cloudpickle.loads(blob)
        ns.setdefault("display", display)
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
        sys.stdout, sys.stderr = saved
        if restore_display is not None:
            restore_display()
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
