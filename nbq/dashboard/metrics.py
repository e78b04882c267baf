"""``/metrics``: a broker's numbers in Prometheus' text exposition format (version 0.0.4),
written directly: a handful of gauges and counters need no client library."""
from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(name: str, kind: str, doc: str, samples: list[tuple[dict, float | None]]) -> str:
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
    suffix = "_total" if kind == "counter" else ""
    for labels, value in samples:
        if value is None:
            continue
        inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        lines.append(f"{name}{suffix}{{{inner}}} {float(value)!r}" if inner
                     else f"{name}{suffix} {float(value)!r}")
    return "\n".join(lines)


def render(m: dict, broker: str) -> str:
    """The text of State.metrics() for the broker at address broker."""
    workers = [w for w in m["workers"] if w.get("online")]
    b = {"broker": broker}
    fams = [
        _family("nbq_workers", "gauge", "Workers connected to the broker.", [(b, len(workers))]),
        _family("nbq_worker_processes", "gauge", "Worker processes of each worker.",
                [({**b, "worker": w["name"]}, len(w.get("processes") or ())) for w in workers]),
        _family("nbq_worker_active", "gauge", "Tasks each worker is running.",
                [({**b, "worker": w["name"]}, w.get("active")) for w in workers]),
        _family("nbq_worker_memory_bytes", "gauge", "Resident memory of each worker.",
                [({**b, "worker": w["name"]}, w.get("memory")) for w in workers]),
        _family("nbq_worker_processed", "counter", "Tasks each worker finished.",
                [({**b, "worker": w["name"]}, w.get("processed")) for w in workers]),
        _family("nbq_worker_failed", "counter", "Tasks that failed on each worker.",
                [({**b, "worker": w["name"]}, w.get("failed")) for w in workers]),
        _family("nbq_queue_length", "gauge", "Tasks waiting in each queue.",
                [({**b, "queue": q["name"]}, q["length"]) for q in m["queues"]]),
        _family("nbq_tasks", "gauge", "Tasks the dashboard keeps, by state.",
                [({**b, "state": s}, n) for s, n in sorted(m["states"].items())]),
        _family("nbq_events", "counter", "Task events seen since the dashboard started, by type "
                "(items: a map chunk's counts its items).",
                [({**b, "type": t}, n) for t, n in sorted(m["totals"].items())]),
        _family("nbq_task_runtime_seconds", "gauge", "Task runtime quantiles over the last "
                "ten minutes.", [({**b, "quantile": q}, v) for q, v in m["latency"].items()]),
    ]
    return "\n".join(fams) + "\n"
