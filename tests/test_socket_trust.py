"""Clients refuse a socket another user controls: a squatted per-user directory, or a
listener whose uid (SO_PEERCRED) is not one the client trusts. Nothing is sent to it.

Playing the other user needs root (chown, and seteuid around ``listen()``: the kernel
records the listener's effective uid then)."""
import contextlib
import os
import shutil
import socket
from pathlib import Path

import pytest

from sidecar import AsyncClient, Client
from sidecar.wire.address import client_socket_path
from sidecar.errors import SidecarTimeout, SidecarUnavailable, UntrustedSocket

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to create files and listen as another uid")

NOBODY = 65534


@contextlib.contextmanager
def listener(path: Path, uid: int):
    """A socket at ``path`` listening as ``uid`` that never answers."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.seteuid(uid)
    try:
        srv.listen(8)
    finally:
        os.seteuid(0)
    srv.setblocking(False)
    try:
        yield srv
    finally:
        srv.close()


def received_nothing(srv: socket.socket) -> bool:
    """Every connection the refusing client made was closed before a byte was sent."""
    got = b""
    while True:
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return got == b""
        with conn:
            conn.settimeout(5)
            got += conn.recv(1 << 16)


def refused_async(path: str | None, run_async, **kwargs) -> UntrustedSocket:
    async def main():
        with pytest.raises(UntrustedSocket) as info:
            async with AsyncClient(path, timeout=2, **kwargs) as c:
                await c.ping()
        return info.value

    return run_async(main())


def test_squatted_private_directory_is_refused(monkeypatch, run_async):
    private = Path(f"/tmp/llm-sidecar-{os.getuid()}")
    if private.exists() or Path("/run/llm.sock").exists():
        pytest.skip(f"{private} or /run/llm.sock exists: a real daemon may be using it")
    monkeypatch.delenv("LLM_SIDECAR_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    private.mkdir(mode=0o700)
    try:
        os.chown(private, NOBODY, NOBODY)  # another user created it first
        with listener(private / "llm.sock", NOBODY) as srv:
            assert client_socket_path() == private / "llm.sock"
            with pytest.raises(SidecarUnavailable, match="owned by uid 65534") as info:
                Client(timeout=2).ping()
            assert isinstance(info.value, UntrustedSocket)
            assert str(private) in str(info.value) and "expected_uid" in str(info.value)
            assert "owned by uid 65534" in str(refused_async(None, run_async))
            assert received_nothing(srv)
    finally:
        shutil.rmtree(private)


def test_listener_of_another_uid_is_refused(tmp_path, run_async):
    path = tmp_path / "other.sock"  # a directory of ours: its owner adds no trust
    with listener(path, NOBODY) as srv:
        with pytest.raises(SidecarUnavailable, match="runs as uid 65534, not as uid 0"):
            Client(path, timeout=2).ping()
        assert "runs as uid 65534" in str(refused_async(str(path), run_async))
        with pytest.raises(UntrustedSocket, match="not as uid 0 or 12345"):
            Client(path, timeout=2, expected_uid=12345).ping()
        assert received_nothing(srv)
        # Told to expect that uid, the client talks to it (and waits for a hello that
        # this listener never sends).
        with pytest.raises(SidecarTimeout):
            Client(path, timeout=0.3, expected_uid=NOBODY).ping()


def test_owner_of_a_closed_directory_is_trusted(tmp_path):
    # A service user's runtime directory: only its owner can put a socket there.
    service = tmp_path / "service"
    service.mkdir(mode=0o755)
    os.chown(service, NOBODY, NOBODY)
    with listener(service / "llm.sock", NOBODY):
        with pytest.raises(SidecarTimeout):  # trusted: it got as far as hello
            Client(service / "llm.sock", timeout=0.3).ping()
        service.chmod(0o777)  # anyone could have put it there now
        with pytest.raises(UntrustedSocket, match="runs as uid 65534"):
            Client(service / "llm.sock", timeout=2).ping()
