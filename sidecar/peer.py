"""Who is at the other end of a Unix socket: ``SO_PEERCRED``.

The kernel names the process at the other end of a connected Unix socket; the daemon keys
its per-user and per-process connection bounds on it (and later, access rules).
"""
from __future__ import annotations

import socket
import struct
from typing import NamedTuple, Protocol

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Peer(NamedTuple):
    """The credentials of the process at the other end of a connection, as the kernel
    recorded them (at ``connect()`` for a client, at ``listen()`` for a server)."""

    pid: int
    uid: int
    gid: int


class _HasSockopt(Protocol):  # socket.socket, asyncio's TransportSocket, uvloop's
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def peer_of(sock: _HasSockopt) -> Peer:
    """The peer of a connected Unix socket (raises ``OSError`` for other sockets)."""
    return Peer._make(_UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


__all__ = ["Peer", "peer_of"]
