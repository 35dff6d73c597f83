"""Fixtures that start real daemons as subprocesses on temporary sockets."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

START_TIMEOUT = 15.0


def wait_for(predicate, timeout: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (tests never assert
    durations: they wait for a state, and fail only when it never comes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Daemon:
    """A ``llm-sidecar serve`` subprocess; ``stop()`` sends SIGTERM and returns the code."""

    def __init__(self, workdir: Path, socket_path: Path, config: Path | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 pass_socket: bool = True) -> None:
        self.workdir = workdir
        self.path = socket_path
        self.config = config
        self.log_path = workdir / f"daemon-{socket_path.name}.log"
        cmd = [sys.executable, "-m", "sidecar", "serve", *args]
        if pass_socket:
            cmd += ["--socket", str(socket_path)]
        if config is not None:
            cmd += ["--config", str(config)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
        full_env["XDG_STATE_HOME"] = str(workdir / "state")  # each test its own journal
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        # cwd is the temp dir so the source tree never shadows the installed package.
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self) -> Daemon:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.path))
                    return self
                except OSError:
                    time.sleep(0.02)
        raise AssertionError(f"daemon did not start: {self.log()}")

    def wait_semantic_ready(self, timeout: float = 60.0) -> None:
        """Until the semantic cache's model has loaded (it loads after start)."""
        from sidecar import Client

        deadline = time.monotonic() + timeout
        with Client(self.path) as c:
            while (status := c.stats().cache.semantic) == "loading":
                assert time.monotonic() < deadline, "semantic tier still loading"
                time.sleep(0.05)
        assert status == "ready", status

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon ignored SIGTERM: {self.log()}") from None
        finally:
            self._log.close()
        return code


@pytest.fixture
def start_daemon(tmp_path):
    started: list[Daemon] = []

    def start(config_text: str | None = None, *, socket_path: Path | None = None,
              env: dict[str, str] | None = None, wait: bool = True,
              args: tuple[str, ...] = (), pass_socket: bool = True) -> Daemon:
        config = None
        if config_text is not None:
            config = tmp_path / f"config{len(started)}.toml"
            config.write_text(config_text)
        d = Daemon(tmp_path, socket_path or tmp_path / "llm.sock", config, env, args,
                   pass_socket)
        started.append(d)
        return d.wait_ready() if wait else d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)
            d.stop()
        elif not d._log.closed:
            d._log.close()


@pytest.fixture
def daemon(start_daemon) -> Daemon:
    return start_daemon()


@pytest.fixture(params=["asyncio", "uvloop"])
def run_async(request):
    """Run a coroutine to completion under the given loop, with a 60 s timeout."""

    def run(coro, timeout: float = 60.0):
        async def bounded():
            return await asyncio.wait_for(coro, timeout)

        if request.param == "uvloop":
            return uvloop.run(bounded())
        return asyncio.run(bounded())

    run.loop = request.param
    return run


@pytest.fixture
def redis_server(tmp_path):
    """A started ``redis_servers.RedisServer`` (no persistence), stopped at teardown."""
    from redis_servers import RedisServer  # here: only Redis tests pay for importing redis-py

    with RedisServer(workdir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_cluster(tmp_path):
    """A started 3-master ``redis_servers.RedisClusterServers``, stopped at teardown."""
    from redis_servers import RedisClusterServers

    with RedisClusterServers(workdir=tmp_path / "redis-cluster") as cluster:
        yield cluster
