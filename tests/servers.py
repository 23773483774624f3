"""Real servers on 127.0.0.1 for integration tests: the library's own (sarflow.local.services), so
tests start them exactly as `sarflow services up` does."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sarflow.local.services import free_port, start_s3, stop, wait_http

__all__ = ["free_port", "start_moto", "stop", "wait_http"]


def start_moto(log: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1 (no authentication: any key is accepted)."""
    return start_s3(log, env=extra_env)
