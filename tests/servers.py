"""Real servers on 127.0.0.1 for integration tests: start on a free port, wait until they
answer, stop. (moto in server mode as the S3-compatible store, `mlflow server`.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on (the kernel's pick, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    for attempt in range(3):  # the free port may be taken between picking it and binding it
        try:
            return start_moto_once(log, extra_env)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_moto_once(log: Path, extra_env: dict[str, str] | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **(extra_env or {})}
    with open(log, "wb") as fh:  # the server's request log goes to a file, never a pipe that could fill
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    # the moto API does not count as an AWS action (it leaves INITIAL_NO_AUTH_ACTION_COUNT alone)
    wait_http(url + "/moto-api/data.json", proc, log, seconds=30, poll=0.1)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 90, poll: float = 0.3) -> None:
    """Waits until `url` answers; a server that exits or stays silent is stopped and reported with its log."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"{url} did not answer within {seconds} s: {log.read_text()[-3000:]}")
            time.sleep(poll)
