"""Start `vv-serve` as a child process and wait until it listens (for bench_serve and the tests).

    with ServerProcess(["--engine-dir", "engines/tiny-random", "--voices", "examples"]) as server:
        requests.post(server.url + "/v1/audio/speech", json={...})

`command` replaces `python -m vv_runtime.serve` (a harness printing the same line). The server is
started with `--port 0` unless a port is given; the port it picked is read from its
"listening on" line. Its output goes to a log file (`server.log_path`) so that a full pipe never
blocks it.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LISTENING = re.compile(r"vv-serve: listening on (http://\S+)")


class ServerProcess:
    def __init__(self, args: list[str], startup_timeout: float = 120.0, env: dict | None = None,
                 log_path: str | Path | None = None, command: list[str] | None = None):
        self.command = list(command) if command else [sys.executable, "-m", "vv_runtime.serve"]
        self.args = [str(a) for a in args]
        if "--port" not in self.args:
            self.args += ["--port", "0"]
        self.startup_timeout = startup_timeout
        self.env = env
        if log_path:
            self.log_path = Path(log_path)
        else:  # a log of its own: read until this process ends (tests read it after stop), then removed
            handle, name = tempfile.mkstemp(prefix="vv-serve-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
            atexit.register(self.log_path.unlink, missing_ok=True)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> "ServerProcess":
        log = open(self.log_path, "wb")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen([*self.command, *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"vv-serve exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"vv-serve did not listen within {self.startup_timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the drain; kill if it takes longer than `timeout`. Returns the exit status."""
        if self.proc is None:
            return 0
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
