"""A real `mlflow server` on a loopback port, started and killed by the tests; and a server that
holds every request it gets without answering, until the test lets go."""

import os
import signal
import socket
import subprocess
import sys
import threading
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


@contextmanager
def held_server():
    """Yields (uri, held): a tracking URI whose server accepts each connection and never answers
    while the block runs, and an Event set once the first request is being held. Leaving the
    block closes every held connection, so a client stuck in a request fails then."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    held, conns, done = threading.Event(), [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                conns.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return
            held.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        done.set()
        thread.join(5)
        for conn in conns:
            conn.close()
        listener.close()


def finishes_within(seconds: float, call) -> bool:
    """Run call() in a thread; True if it returned within `seconds` (it may still be running)."""
    returned = threading.Event()
    threading.Thread(target=lambda: (call(), returned.set()), daemon=True).start()
    return returned.wait(seconds)
