"""What a person reads while a pipeline runs locally: one line per task (`[n/N] name`, status,
seconds, elapsed; on a terminal the running task shows until its result replaces it), each task's
full output in its own log file, and on a failure the task's last lines and the path of its log.

kfp.local prints everything (its own log lines, every task's streamed output, the executor input
JSON, the outputs) to `sys.stdout`; :class:`TaskConsole` stands in for it during a run, writes all
of it to `<log_dir>/pipeline.log` and `<log_dir>/<task>.log`, and passes only the task lines to the
terminal (everything, with `verbose`)."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
TAIL_LINES = 15


def count_tasks(pipeline) -> int | None:
    """Executor tasks in the compiled spec, sub-DAGs included (a ParallelFor body counts once; of
    dsl.If/Elif/Else branches, KFP's `condition-branches-*` group, only the largest counts: one runs)."""
    spec = getattr(pipeline, "pipeline_spec", None)
    if spec is None:
        return None
    components = spec.components

    def count(dag) -> int:
        n = 0
        for task in dag.tasks.values():
            comp = components.get(task.component_ref.name)
            if comp is None or not comp.HasField("dag"):
                n += 1
                continue
            inner = [count(components[t.component_ref.name].dag) if components[t.component_ref.name].HasField("dag")
                     else 1 for t in comp.dag.tasks.values()]
            branches = task.component_ref.name.startswith("comp-condition-branches-")
            n += max(inner, default=0) if branches else count(comp.dag)
        return n

    return count(spec.root.dag)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class TaskConsole(io.TextIOBase):
    """A text stream for `sys.stdout` during a local run (see the module's docstring)."""

    def __init__(self, log_dir: str | Path, total: int | None = None, verbose: bool = False, terminal=None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.total, self.verbose = total, verbose
        self.terminal = terminal or sys.stdout
        # a terminal shows the running task and replaces it by its result; a log or a pipe gets results only
        self.live = bool(getattr(self.terminal, "isatty", lambda: False)())
        self.all = open(self.log_dir / "pipeline.log", "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.t0 = time.monotonic()
        self.n = 0
        self.finished: list[tuple[str, str, float]] = []  # (task, status, seconds)
        self.failed: tuple[str, Path] | None = None
        # kfp.local runs a ParallelFor's iterations in threads, each dispatching (logging and
        # streaming) its task in its own thread: a task's state and its partial line are per thread
        self._lock = threading.Lock()
        self._running: dict[int, dict] = {}  # thread -> {task, log, path, started, n}
        self._buffers: dict[int, str] = {}
        self._paths: set[Path] = set()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self.all.closed:  # a logging handler kfp left pointing here after the run: pass it on
                self.terminal.write(text)
                return len(text)
            if self.verbose:
                self.terminal.write(text)
            me = threading.get_ident()
            *lines, self._buffers[me] = (self._buffers.get(me, "") + text).split("\n")
            for line in lines:
                self._line(me, _ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self.all.closed:
                return
            self.all.flush()
            for state in self._running.values():
                state["log"].flush()
            self.terminal.flush()

    def _say(self, text: str, running: bool = False) -> None:
        """A line for the terminal; `running` (a task started): shown only on a live terminal, and
        replaced by the next line."""
        if self.verbose or (running and not self.live):
            return
        self.terminal.write(("\r\x1b[K" if self.live else "") + text + ("" if running else "\n"))
        self.terminal.flush()

    def _progress(self, n: int) -> str:
        return f"[{n}/{self.total}]" if self.total and n <= self.total else f"[{n}]"

    def _new_log_path(self, task: str) -> Path:
        """`<task>.log`, or `<task>-2.log`, ... for the next run of a task of the same name (loop iterations)."""
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)
        path, k = self.log_dir / f"{base}.log", 1
        while path in self._paths:
            k += 1
            path = self.log_dir / f"{base}-{k}.log"
        self._paths.add(path)
        return path

    def _line(self, me: int, line: str) -> None:
        self.all.write(line + "\n")
        start, end = _START.search(line), _END.search(line)
        if start:
            if me in self._running:
                self._running.pop(me)["log"].close()
            self.n += 1
            path = self._new_log_path(start.group(1))
            state = {"task": start.group(1), "path": path, "started": time.monotonic(), "n": self.n,
                     "log": open(path, "w", encoding="utf-8")}  # noqa: SIM115 - closed when the task ends
            self._running[me] = state
            self._say(f"{self._progress(state['n'])} {state['task']} ... (elapsed {_clock(state['started'] - self.t0)})",
                      running=True)
        state = self._running.get(me)
        if state is not None:
            state["log"].write(line + "\n")
        if end and state is not None:
            status, seconds = end.group(2), time.monotonic() - state["started"]
            self.finished.append((state["task"], status, seconds))
            state["log"].flush()
            if status == "SUCCESS":
                self._say(f"{self._progress(state['n'])} {state['task']} done in {seconds:.1f} s "
                          f"(elapsed {_clock(time.monotonic() - self.t0)})")
            else:
                self.failed = (state["task"], state["path"])
                tail = state["path"].read_text(encoding="utf-8").splitlines()[-TAIL_LINES:]
                self._say(f"{self._progress(state['n'])} {state['task']} FAILED after {seconds:.1f} s; "
                          f"its full log: {state['path']}")
                self._say("\n".join("    " + t for t in tail))

    def close(self) -> None:
        with self._lock:
            for me, rest in list(self._buffers.items()):
                if rest:
                    self._line(me, _ANSI.sub("", rest))
            self._buffers.clear()
            for state in self._running.values():
                state["log"].close()
            self._running.clear()
            self.all.close()
        super().close()


def run_report(summary: dict, log_dir: str | Path | None = None) -> str:
    """A local run's summary (`LocalRun.summary()`) as a person reads it."""
    lines = [f"pipeline {summary['pipeline']}: {summary.get('state') or 'finished'} in {_clock(summary['seconds'])} "
             f"({len(summary['tasks'])} task folders)",
             f"  run folder: {summary['run_dir']}"]
    lines += [f"  chip store: {s}" for s in summary.get("stores", [])]
    lines += [f"  dataset version: {v.get('dvc_md5') or v.get('version') or v}" + (f" ({v['store']})" if "store" in v else "")
              for v in summary.get("versions", [])]
    if log_dir is not None:
        lines.append(f"  task logs: {log_dir}")
    return "\n".join(lines)
