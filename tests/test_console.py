"""Issue 15: a local pipeline run reads as one line per task; each task's full output is in its
own log file, and a failure names that file. A real two-task pipeline under kfp.local."""


import io
import re

import pytest
from kfp import dsl

from sarflow.mlops.console import TaskConsole, count_tasks
from sarflow.mlops.kfp_runner import PipelineError, run_local


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def say(word: str) -> str:
    print(f"the task prints {word}")
    return word.upper()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def shout(word: str, fail: bool) -> str:
    print(f"shouting {word}")
    if fail:
        raise ValueError(f"cannot shout {word}")
    return word + "!"


@dsl.pipeline(name="console-check")
def two_tasks(fail: bool = False):
    first = say(word="hello")
    shout(word=first.output, fail=fail)


@dsl.pipeline(name="console-branches")
def branches(pick: int = 0):
    first = say(word="hello")
    with dsl.If(pick == 0):
        say(word="a")
        shout(word="a", fail=False)
    with dsl.Else():
        say(word="b")
    with dsl.If(first.output == "HELLO"):
        shout(word="c", fail=False)


@dsl.pipeline(name="console-two-ifs")
def two_ifs(pick: int = 0):
    with dsl.ParallelFor([1, 2]):  # a body of two separate dsl.If blocks: both may run
        with dsl.If(pick == 0):
            say(word="a")
        with dsl.If(pick == 1):
            say(word="b")


def test_count_tasks_counts_executor_tasks():
    assert count_tasks(two_tasks) == 2
    # If/Else: one branch runs, the larger one counts (2); a lone dsl.If counts its task
    assert count_tasks(branches) == 1 + 2 + 1
    assert count_tasks(two_ifs) == 2


def _run(tmp_path, fail: bool, verbose: bool = False):
    """Runs the pipeline with the console's terminal captured (pytest's capture stands in for stdout)."""
    terminal = io.StringIO()
    init = TaskConsole.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskConsole, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "terminal": terminal}))
        run_local(two_tasks, tmp_path / "kfp", log_dir=tmp_path / "logs", verbose=verbose, fail=fail)
    return terminal.getvalue()


def test_a_run_prints_one_line_per_task_and_logs_each_task(tmp_path):
    out = _run(tmp_path, fail=False)  # not a terminal: results only
    lines = out.strip().splitlines()
    assert re.fullmatch(r"\[1/2\] say done in \d+\.\d s \(elapsed \d:\d\d\)", lines[0]), out
    assert lines[1].startswith("[2/2] shout done in"), out
    assert len(lines) == 2 and "executor_input" not in out and "the task prints" not in out
    assert "the task prints hello" in (tmp_path / "logs" / "say.log").read_text()
    assert "shouting HELLO" in (tmp_path / "logs" / "shout.log").read_text()
    assert "executor_input" in (tmp_path / "logs" / "pipeline.log").read_text()


def test_a_failed_task_names_its_log_and_shows_its_last_lines(tmp_path):
    with pytest.raises(PipelineError) as e:
        _run(tmp_path, fail=True)
    log = tmp_path / "logs" / "shout.log"
    assert f"its full log: {log}" in str(e.value)
    assert "ValueError: cannot shout HELLO" in log.read_text()


def test_verbose_passes_everything_through(tmp_path):
    out = _run(tmp_path, fail=False, verbose=True)
    assert "the task prints hello" in out and "[1/2]" not in out


def test_on_a_terminal_the_running_task_shows_until_its_result_replaces_it(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    console = TaskConsole(tmp_path / "logs", total=1, terminal=screen)
    console.write("12:00:00.000 - INFO - Executing task \x1b[96m'tile'\x1b[0m\nstreamed\n")
    assert screen.getvalue().endswith("[1/1] tile ... (elapsed 0:00)")
    console.write("12:00:01.000 - INFO - Task 'tile' finished with status \x1b[92mSUCCESS\x1b[0m\n")
    console.close()
    assert re.fullmatch(r"\r\x1b\[K\[1/1\] tile \.\.\. \(elapsed 0:00\)\r\x1b\[K\[1/1\] tile done in \d\.\d s \(elapsed 0:00\)\n",
                        screen.getvalue()), repr(screen.getvalue())
    assert (tmp_path / "logs" / "tile.log").read_text().splitlines()[1] == "streamed"


@dsl.pipeline(name="console-loop")
def loop_tasks():
    with dsl.ParallelFor(items=["a", "b", "c"], parallelism=2) as word:
        say(word=word)


def test_loop_iterations_get_a_log_each_and_a_line_each(tmp_path):
    """kfp.local runs a ParallelFor's iterations in threads: each iteration's output lands in its own
    log (`say.log`, `say-2.log`, ...), never in another's."""
    terminal = io.StringIO()
    init = TaskConsole.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskConsole, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "terminal": terminal}))
        run_local(loop_tasks, tmp_path / "kfp", log_dir=tmp_path / "logs")
    # (the count of "done" lines is not asserted: kfp.local swaps the root logger's handlers per task, so
    # with iterations in parallel threads a task's end line can reach another handler than the console)
    assert "executor_input" not in terminal.getvalue()
    import logging  # no handler is left writing into the closed console

    assert not [h for h in logging.getLogger().handlers if isinstance(getattr(h, "stream", None), TaskConsole)]
    logs = sorted((tmp_path / "logs").glob("say*.log"))
    assert [p.name for p in logs] == ["say-2.log", "say-3.log", "say.log"]
    said = sorted(next(w for w in "abc" if f"the task prints {w}" in p.read_text()) for p in logs)
    assert said == ["a", "b", "c"]
    for p in logs:  # one iteration's output each
        assert sum(f"the task prints {w}" in p.read_text() for w in "abc") == 1, p.read_text()


def test_a_run_leaves_print_and_the_root_logger_as_the_caller_had_them(tmp_path, monkeypatch):
    """kfp.local swaps `builtins.print` (an indenting one) and the root logger's handlers per task;
    its ParallelFor threads interleave those swaps, which can leave them in place for the rest of the
    process (then every `print(..., file=sys.stderr)` put four spaces on stdout). That outcome is
    forced here (the swaps never undone); the runner gives the caller its own back."""
    import builtins
    import contextlib
    import logging
    import sys

    from kfp.local import logging_utils

    @contextlib.contextmanager
    def leaking_print(num_spaces: int = 4):
        original = builtins.print
        builtins.print = lambda *a, **k: (original(" " * num_spaces, end=""), original(*a, **k))
        yield

    @contextlib.contextmanager
    def leaking_logger():
        logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
        logging.getLogger().setLevel(logging.DEBUG)
        yield

    monkeypatch.setattr(logging_utils, "indented_print", leaking_print)
    monkeypatch.setattr(logging_utils, "local_logger_context", leaking_logger)
    before = (builtins.print, list(logging.getLogger().handlers), logging.getLogger().level)
    run_local(loop_tasks, tmp_path / "kfp", log_dir=tmp_path / "logs")
    assert builtins.print is before[0]
    assert logging.getLogger().handlers == before[1] and logging.getLogger().level == before[2]
