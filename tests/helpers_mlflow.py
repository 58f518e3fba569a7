"""A real `mlflow server` on a loopback port, started and killed by the tests."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {url} not healthy after {seconds} s")


def stop(proc: subprocess.Popen) -> None:
    # The server runs in its own session; its group holds the workers, so kill them all.
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextmanager
def server_processes(root: Path, port: int):
    """start() runs `mlflow server` on 127.0.0.1:port over root's store; all are killed at exit."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
               "--artifacts-destination", str(root / "art")]
        log = open(root / f"server{len(started)}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                start_new_session=True)
        started.append(proc)
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            stop(proc)
