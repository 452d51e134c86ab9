"""Servers the tests start for real (mlflow server, noisyrollout serve): a free port on 127.0.0.1, a process in its
own session with its log in a file, waiting until an URL answers 200, and a stop by the PID the test started; and
the tests' own small HTTP servers (a fake judge) served from a thread."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path


@contextlib.contextmanager
def serving(server: HTTPServer) -> Iterator[HTTPServer]:
    """`server` answering from a daemon thread while the block runs; shut down and closed after it."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], *, ready: str, log: Path, cwd: Path, env: dict | None = None,
            timeout: float = 240) -> Iterator[subprocess.Popen]:
    """`cmd` started in its own session (output to `log`), yielded once `ready` answers HTTP 200; on exit its whole
    session is stopped (SIGTERM, then SIGKILL after 30 s)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, f"{cmd[0]} exited: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(ready, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"{ready} did not answer in {timeout:.0f} s"
            time.sleep(1)
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:   # the session is gone already (a test killed it)
            proc.wait()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
