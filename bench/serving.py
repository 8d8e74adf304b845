"""A `gata-ft serve` (or any HTTP server) started by a benchmark: a free port, and ready."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(port: int, server: subprocess.Popen, seconds: float = 60) -> None:
    """Return once GET /ping answers; exit the benchmark if the server died or never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            return
        except OSError:
            if server.poll() is not None:
                message = f"the server on port {port} exited ({server.returncode})"
                raise SystemExit(message) from None
            time.sleep(0.1)
    raise SystemExit(f"the server on port {port} did not answer /ping in {seconds:g} s")
