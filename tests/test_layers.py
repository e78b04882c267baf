"""The architecture's rules (docs/architecture.md), checked on the package's own source.

Each module belongs to a layer; a layer may import only the layers listed for it.
Imports inside functions count too: a lazy import is still an arrow.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import nbq

PACKAGE = Path(nbq.__file__).parent

#: (module prefix, layer), most specific first: a module is in the layer of its first match.
LAYERS = [
    ("nbq.worker.context", "worker-api"),
    ("nbq.errors", "core"), ("nbq.states", "core"), ("nbq.policy", "core"),
    ("nbq.protocol", "core"), ("nbq.schema", "core"), ("nbq.keys", "core"),
    ("nbq.secure", "core"), ("nbq.shm", "core"), ("nbq.replay", "core"), ("nbq.results", "core"),
    ("nbq.deaths", "core"), ("nbq.events", "core"), ("nbq.utils", "core"),
    ("nbq.transport", "transport"),
    ("nbq.broker", "broker"),
    ("nbq.worker", "worker"),
    ("nbq.client", "client"), ("nbq.cluster", "client"),
    ("nbq.clusters", "client"),
    ("nbq.notebook", "notebook"),
    ("nbq.tasks", "tasks"), ("nbq.exceptions", "tasks"), ("nbq.result", "tasks"),
    ("nbq.schedules", "tasks"),
    ("nbq.version", "core"), ("nbq.zmqframes", "core"),
    ("nbq.dashboard", "dashboard"),
    ("nbq.cli", "app"), ("nbq.jupyter_ext", "app"), ("nbq.demo", "app"), ("nbq.multi", "app"), ("nbq.__main__", "app"),
    ("nbq", "app"),  # the package's __init__: the public facade
]

BELOW = {
    "core": {"core"},
    "transport": {"core", "transport"},
    "broker": {"core", "broker"},
    "worker-api": {"core"},
    "worker": {"core", "transport", "worker", "worker-api"},
    # the client layer starts local brokers and worker processes (clusters/)
    "client": {"core", "transport", "broker", "worker", "worker-api", "client"},
    "notebook": {"core", "client", "worker-api", "notebook"},  # the remote cell runs on workers
    "tasks": {"core", "client", "worker-api", "tasks"},
    # the web dashboard watches and steers through the client and the tasks layer's revoke
    "dashboard": {"core", "transport", "client", "worker-api", "tasks", "dashboard"},
    "app": {"core", "transport", "broker", "worker", "worker-api", "client", "notebook",
            "tasks", "dashboard", "app"},
}


def layer(module: str) -> str:
    for prefix, name in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise AssertionError(f"module {module} is in no layer: add it to LAYERS and the docs")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nbq_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an nbq module in the file, relative ones resolved."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nbq"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nbq":
                continue
            # `from . import x` / `from .pkg import mod` may name submodules
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if _is_module(sub) else target))
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def test_every_import_follows_the_layer_rules():
    wrong = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        mine = layer(here)
        for line, target in nbq_imports(path):
            if layer(target) not in BELOW[mine]:
                wrong.add(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} ({mine}) "
                             f"imports {target} ({layer(target)})")
    assert not wrong, "imports against docs/architecture.md's rules:\n" + "\n".join(sorted(wrong))


def test_the_rules_catch_an_upward_import(tmp_path):
    """The checker itself: a transport module importing the client is reported."""
    assert layer("nbq.transport.zmq") == "transport"
    assert "client" not in BELOW[layer("nbq.transport.zmq")]
    assert layer("nbq.notebook.magics") not in BELOW["client"]


def test_importing_nbq_starts_patches_and_registers_nothing():
    code = textwrap.dedent("""
        import atexit, logging, signal, sys, threading, types
        import cloudpickle, pandas, redis, zmq  # what they register is theirs
        threads, exits = threading.active_count(), atexit._ncallbacks()
        handlers = list(logging.getLogger().handlers)
        sigs = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
        hook = sys.excepthook
        import nbq
        assert threading.active_count() == threads, "a thread started"
        assert atexit._ncallbacks() == exits, "an exit hook registered"
        assert logging.getLogger().handlers == handlers, "a log handler added"
        assert {s: signal.getsignal(s) for s in sigs} == sigs, "a signal handler set"
        assert sys.excepthook is hook, "sys.excepthook replaced"
        odd = [n for n, m in sys.modules.items()
               if n.split(".")[0] == "nbq" and type(m) is not types.ModuleType]
        assert not odd, f"module classes swapped: {odd}"
        loaded = [n for n in sys.modules if n.startswith(("nbq.notebook", "IPython", "ipywidgets"))]
        assert not loaded, f"the notebook layer was imported: {loaded}"
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
