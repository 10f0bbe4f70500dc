"""Starting ``mlm serve`` in a subprocess on a free 127.0.0.1 port and stopping it with its workers (benchmarks, tests).

The server runs in its own session, so stopping it signals its whole process group: the API process and the model
workers LitServe spawned, and nothing else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: str, *options: str, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server that answers /health with 200; RuntimeError with its output otherwise."""
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "mlm.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port), *options]
    log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the server runs, and a full pipe would block it
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_server(process)  # workers it started may outlive it
            log.seek(0)
            raise RuntimeError(f"mlm serve exited with {process.returncode}: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"mlm serve did not become healthy within {timeout_s:.0f} s")


def server_processes(process: subprocess.Popen) -> list:
    """psutil handles of the server and every process under it (its workers)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_server(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``grace_s``."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
