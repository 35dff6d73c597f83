"""Composition root: config -> components -> server; socket ownership, signals, sd_notify.

``run`` owns the process-level concerns: it claims the socket path (lock file, stale
socket probe) and binds it with the configured mode, or adopts the socket systemd passed
by socket activation, reloads on SIGHUP (validate first, keep the
old config on error), and on SIGTERM/SIGINT stops accepting, answers what has arrived,
removes the socket and its lock file and returns 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path

import orjson
import uvloop

from .. import config as config_mod
from ..cache.snapshot import SnapshotError, write_snapshot
from ..config import Config
from ..ledger.alerts import Notifier
from ..errors import (
    ConfigError, DaemonStartError, JournalError, Overloaded, TokenizerUnavailable,
)
from .handlers import Handlers
from ..limits.journal import Journal
from ..ledger.requestlog import RequestLog
from ..ledger.metrics import Exposition, Metrics
from ..wire.peer import PRIVATE_DIR_PREFIX, private_dir_problem
from ..wire import OPS
from ..wire.shm import Publisher, segment_path
from .server import MetricsListener, Server

log = logging.getLogger("sidecar.daemon")


def _prepare_directory(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        private = parent.name.startswith(PRIVATE_DIR_PREFIX)
        parent.mkdir(mode=0o700 if private else 0o755, parents=True)
    problem = private_dir_problem(parent)
    if problem is not None:
        raise DaemonStartError(f"{problem}; remove it or pass --socket PATH")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _claim(path: Path) -> int:
    """Lock ``<socket>.lock`` for the daemon's lifetime and clear a stale socket."""
    lock_path = _lock_path(path)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonStartError(
                f"another llm-sidecar daemon (pid {owner}) owns {path}; stop it first "
                "or pass --socket PATH") from None
        if _is_file(fd, lock_path):
            break
        # The previous owner removed the file (``_unclaim``) after we opened it: a lock
        # on an unlinked file excludes no one, so take the new one.
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            _unclaim(path, fd)
            raise DaemonStartError(f"{path} exists and is not a socket; remove it or pass "
                                   "--socket PATH")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                _unclaim(path, fd)
                raise DaemonStartError(f"cannot probe existing socket {path}: {exc}") from None
            log.info("removing stale socket %s", path)
            path.unlink()
        else:
            _unclaim(path, fd)
            raise DaemonStartError(f"a live daemon already answers on {path}; stop it first "
                                   "or pass --socket PATH")
        finally:
            probe.close()
    return fd


def _is_file(fd: int, path: Path) -> bool:
    """``fd`` is still the file at ``path`` (not replaced or removed since it was opened)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _unclaim(path: Path, fd: int) -> None:
    """Remove the lock file, while still holding its lock and only if it is ours, then
    release it."""
    lock_path = _lock_path(path)
    with contextlib.suppress(FileNotFoundError):  # already gone is fine
        if _is_file(fd, lock_path):
            lock_path.unlink()
    os.close(fd)


def _bind(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise DaemonStartError(f"cannot listen on {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _notify(message: str) -> None:
    """Tell systemd (Type=notify) about state changes; a no-op elsewhere."""
    target = config_mod.notify_socket()
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), target)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", message, exc)


def _adopt(fd: int) -> socket.socket:
    """Take over a listening Unix socket passed by systemd socket activation."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise DaemonStartError(f"inherited fd {fd} is not a Unix stream socket; "
                               "use ListenStream=/run/llm.sock in the .socket unit")
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, config: Config, path: Path, config_path: str | None,
                 inherited: socket.socket | None = None) -> None:
        self.config = config
        self.path = path
        self.config_path = config_path
        #: A socket systemd owns: never claimed, bound or unlinked by us.
        self.inherited = inherited
        self.metrics = Metrics(OPS)
        where = config_mod.journal_path(config, path)
        self.journal = None if where is None else Journal(where)
        #: fixed at start, like the socket: a changed cache.snapshot needs a restart
        self.cache_path = config_mod.cache_snapshot_path(config, path)
        self.segment: Publisher | None = None
        ledger = config.ledger
        where = config_mod.request_log_path(config, path)
        #: fixed at start, like the socket: a changed path or listener needs a restart
        self.request_log = None if where is None else RequestLog(
            where, max_bytes=ledger.max_bytes, keep=ledger.keep, queue_max=ledger.queue)
        alerts = config.alerts
        self.notifier = Notifier(command=alerts.command, webhook=alerts.webhook,
                                 timeout=alerts.notify_timeout) if (
                                     alerts.command or alerts.webhook) else None
        self.cluster = self._cluster(config)
        self.handlers = Handlers(config, self.metrics, str(path), self.journal,
                                 str(self.cache_path) if self.cache_path else "off",
                                 self.request_log, str(where) if where else "off",
                                 self.notifier, self.cluster)
        self.listener: MetricsListener | None = None
        self._cache_written = -1  # the cache's change count at the last snapshot
        self.server = Server(config, self.handlers, self.metrics)
        self._stop = asyncio.Event()

    @staticmethod
    def _cluster(config: Config):
        """The cluster (cluster mode) or None (standalone: ``redis`` is never imported)."""
        cfg = config.cluster
        if not cfg.redis_url:
            return None
        from ..cluster import Cluster
        from ..cluster.store import RedisStore

        store = RedisStore(cfg.redis_url, cluster=cfg.redis_cluster, timeout=cfg.timeout)
        return Cluster(store, name=cfg.name, lease_ttl=cfg.lease_ttl, heartbeat=cfg.heartbeat,
                       divisor=cfg.divisor, margin=cfg.margin,
                       expected_daemons=cfg.expected_daemons,
                       hold=config.limits.lease_ttl * 2)

    async def _cluster_loop(self) -> None:
        """Heartbeat, lease reports and adjustments once per ``cluster.heartbeat``;
        adjustments also every 0.1 s in between, so other daemons see spend soon."""
        cluster = self.cluster
        assert cluster is not None
        interval = self.config.cluster.heartbeat
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        guard = self.metrics.task_failures.guard
        while True:
            with guard("cluster.sync"):  # every 0.1 s: a traceback each time would flood
                if loop.time() >= next_tick:
                    next_tick = loop.time() + interval
                    await cluster.tick(time.time())
                elif cluster.degraded:
                    cluster.trim(time.time())
                elif cluster.pending:
                    await cluster.flush_now(time.time())
            await asyncio.sleep(min(0.1, interval))

    def reload(self) -> None:
        """SIGHUP: validate the new config fully before anything changes."""
        _notify("RELOADING=1")
        try:
            new = config_mod.load(self.config_path)
            if new.server.socket and Path(new.server.socket) != self.path:
                log.warning("server.socket changed in %s: takes effect after a restart",
                            new.source)
            for key in config_mod.RESTART_ONLY[1:]:
                section, _, name = key.partition(".")
                if (getattr(getattr(new, section), name)
                        != getattr(getattr(self.config, section), name)):
                    log.warning("%s changed: takes effect after a restart", key)
            self.handlers.reload(new)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
        else:
            self.config = new
            self.server.apply(new)
            self._sync_segment()
            logging.getLogger().setLevel(new.log.level.upper())
            log.info("reloaded config from %s (epoch %d)", new.source, self.handlers.epoch)
        finally:
            _notify("READY=1")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        lock_fd = None if self.inherited else _claim(self.path)
        if self.journal is not None:
            await self._restore()
        self._restore_cache()
        try:
            # Before the socket listens: a client may connect (and a supervisor signal)
            # as soon as it does, and a SIGTERM then must stop the daemon cleanly.
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            self._open_segment()  # before the socket listens: a client may look at once
            sock = self.inherited or _bind(self.path, self.config.socket_mode)
            await self._listen_metrics()  # first: a socket that answers means all is up
            await self.server.start(sock)
            housekeeping = loop.create_task(self._housekeeping())
            syncing = loop.create_task(self._cluster_loop()) if self.cluster else None
            log.info("llm-sidecar serving on %s (pid %d, config %s)",
                     self.path, os.getpid(), self.config.source)
            _notify(f"READY=1\nMAINPID={os.getpid()}")
            await self._stop.wait()
            _notify("STOPPING=1")
            log.info("stopping: answering in-flight requests (up to %.1f s)",
                     self.config.server.drain_timeout)
            self.server.stop_accepting()
            self._unlink()
            self._close_segment()
            busy = await self.server.drain(self.config.server.drain_timeout)
            housekeeping.cancel()
            if syncing is not None:
                syncing.cancel()
                await self.cluster.close(time.time())
            if self.listener is not None:
                await self.listener.close()
            await self._snapshot_cache()
            self.handlers.cache.semantic.close()
            if self.journal is not None:
                await self._flush_costs()
                await self.journal.aclose()
            if self.request_log is not None:
                await self.request_log.aclose()
            if self.notifier is not None:
                await loop.run_in_executor(None, self.notifier.close)
            if busy:
                log.warning("closed %d connections still busy after the drain timeout", busy)
            log.info("stopped")
        finally:
            self._unlink()
            self._close_segment()
            if lock_fd is not None:
                _unclaim(self.path, lock_fd)

    async def _restore(self) -> None:
        """Replay the limits journal into the engine, then start it afresh from a
        snapshot so it never grows across restarts."""
        assert self.journal is not None
        try:
            self.journal.path.parent.mkdir(parents=True, exist_ok=True)
            records = self.journal.open()
        except (OSError, JournalError) as exc:
            raise DaemonStartError(f"cannot open the limits journal {self.journal.path}: "
                                   f"{exc}; fix its directory or set limits.journal") from None
        spends, rows = self.handlers.restore(records, time.time())
        log.info("limits journal %s: %d records, %d spends and %d cost rows restored",
                 self.journal.path, len(records), spends, rows)
        compacted = self.handlers.compact_journal(time.time())
        if compacted is not None:
            await compacted

    async def _flush_costs(self) -> None:
        """At shutdown: the cost rows changed since the last journal write."""
        try:
            durable = self.handlers.persist_costs()
            if durable is not None:
                await durable
        except (JournalError, Overloaded) as exc:
            log.error("the last cost rows were not persisted: %s", exc)

    async def _listen_metrics(self) -> None:
        """The optional loopback listener for a Prometheus scraper."""
        cfg = self.config.metrics
        if not cfg.http_port:
            return
        self.listener = MetricsListener(self.handlers.prometheus, Exposition.CONTENT_TYPE)
        try:
            await self.listener.start(cfg.http_address, cfg.http_port)
        except OSError as exc:
            raise DaemonStartError(f"cannot listen for metrics on {cfg.http_address} port "
                                   f"{cfg.http_port}: {exc.strerror}; pick a free port or set "
                                   "metrics.http_port = 0") from None
        log.info("metrics on http://%s:%d/metrics", cfg.http_address, self.listener.port)

    def _restore_cache(self) -> None:
        """Load the cache snapshot; an unusable one is reported, moved aside (kept for a
        post-mortem) and skipped: the daemon starts with an empty cache."""
        if self.cache_path is None:
            return
        try:
            data = self.cache_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cache snapshot %s unreadable (%s): starting with an empty cache",
                      self.cache_path, exc)
            return
        try:
            kept = self.handlers.cache.restore(data, time.time())
        except SnapshotError as exc:
            aside = self.cache_path.with_name(self.cache_path.name + ".corrupt")
            with contextlib.suppress(OSError):  # best effort: the error is logged anyway
                os.replace(self.cache_path, aside)
            log.error("cache snapshot %s is unusable (%s): moved to %s, starting with an "
                      "empty cache", self.cache_path, exc, aside)
            return
        self._cache_written = self.handlers.cache.changes
        log.info("cache snapshot %s: %d entries restored", self.cache_path, kept)

    async def _snapshot_cache(self) -> None:
        """Write the cache snapshot if anything changed since the last one; the file is
        written by a worker thread, replacing the old one atomically."""
        cache = self.handlers.cache
        if self.cache_path is None or cache.changes == self._cache_written:
            return
        changes = cache.changes
        data = cache.snapshot()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, write_snapshot, self.cache_path, data)
        except OSError as exc:
            log.error("cache snapshot %s not written: %s", self.cache_path, exc)
            return
        self._cache_written = changes
        cache.snapshot_at = time.time()

    async def _housekeeping(self) -> None:
        """Once a second: lease expiry and idle-counter eviction in the limits engine,
        cache expiry; every ``cache.snapshot_interval`` a cache snapshot. A step that
        raises is counted (``stats`` ``task_failures``) and the loop goes on."""
        loop = asyncio.get_running_loop()
        next_snapshot = loop.time() + self.config.cache.snapshot_interval
        guard = self.metrics.task_failures.guard
        while True:
            await asyncio.sleep(1.0)
            with guard("housekeeping"):  # its steps guard themselves; this is the backstop
                self.handlers.housekeeping(time.time())
            if loop.time() >= next_snapshot:
                next_snapshot = loop.time() + self.config.cache.snapshot_interval
                with guard("cache.snapshot"):  # an exception here used to end the loop
                    await self._snapshot_cache()

    def _open_segment(self) -> None:
        """The shared-memory segment beside the socket, readable by whoever may read
        the socket (its group; write bits dropped: only this daemon writes answers). A
        segment that cannot be made leaves clients on the socket, which answers the same."""
        cfg = self.config.shm
        if not cfg.enabled:
            return
        mode, gid = self.config.socket_mode, None  # the group the socket will get
        try:
            if self.inherited:  # systemd made the socket: its mode and group decide
                st = os.stat(self.path)
                mode, gid = stat.S_IMODE(st.st_mode), st.st_gid
            self.segment = Publisher(segment_path(self.path), size=cfg.size, slots=cfg.slots,
                                     mode=mode, gid=gid)
        except (OSError, ValueError) as exc:
            log.warning("no shared-memory segment beside %s (%s): clients use the socket "
                        "for every cache hit", self.path, exc)
            return
        self.handlers.segment = self.segment
        self._sync_segment()

    def _sync_segment(self) -> None:
        """Publish what a client needs to compute exact keys as this daemon does, and
        the answers unless ``isolate_cache`` is on: then each uid's answers are its own,
        and a segment every reader of the socket may map holds none of them."""
        if self.segment is None:
            return
        cache, isolate = self.handlers.cache, self.config.server.access.isolate_cache
        if isolate:
            cache.publish_to(None)
            self.segment.clear()
        normalizer = self.handlers.normalizer
        self.segment.set_meta(orjson.dumps({
            "spec": normalizer.spec, "filler_words": list(normalizer.filler_words),
            "isolate_cache": isolate, "kinds": sorted(self.config.cache.policy)}))
        self.segment.set_epoch(self.handlers.epoch)
        if not isolate and cache.publisher is None:
            cache.publish_to(self.segment)

    def _close_segment(self) -> None:
        if self.segment is not None:
            self.handlers.cache.publish_to(None)
            self.handlers.segment = None
            self.segment.close()
            self.segment = None

    def _unlink(self) -> None:
        if self.inherited:
            return
        with contextlib.suppress(FileNotFoundError):  # already gone is fine
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()


def run(config: Config, path: Path | None, config_path: str | None) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code.

    ``path`` None means: use the socket systemd passed (socket activation)."""
    inherited = None
    if path is None:
        fd = config_mod.inherited_listen_fd()
        assert fd is not None
        inherited = _adopt(fd)
        path = Path(inherited.getsockname())
    else:
        _prepare_directory(path)
    try:
        daemon = Daemon(config, path, config_path, inherited)
    except TokenizerUnavailable as exc:
        raise DaemonStartError(exc.detail) from None
    uvloop.run(daemon.serve())
    return 0
