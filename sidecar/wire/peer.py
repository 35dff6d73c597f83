"""Who is at the other end of a Unix socket, and whether to trust a socket path.

The kernel's ``SO_PEERCRED`` names the process at the other end of a connected Unix socket
(for a client: the process that called ``listen()``); the daemon keys connection limits on
it and clients check the daemon's uid with it. The ownership rule of the per-user socket
directory (``llm-sidecar-<uid>`` in /tmp) lives here too, so the daemon that creates the
directory and the clients that trust it apply the same check.
"""
from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import NamedTuple, Protocol

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux's value; Python lacks it
PRIVATE_DIR_PREFIX = "llm-sidecar-"


class Peer(NamedTuple):
    """The credentials of the process at the other end of a connection, as the kernel
    recorded them (at ``connect()`` for a client, at ``listen()`` for a server)."""

    pid: int
    uid: int
    gid: int


class HasSockopt(Protocol):  # socket.socket, asyncio's TransportSocket, uvloop's
    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def peer_of(sock: HasSockopt) -> Peer:
    """The peer of a connected Unix socket (raises ``OSError`` for other sockets)."""
    return Peer._make(_UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def groups_of(sock: HasSockopt) -> frozenset[int]:
    """Every group of the peer: its gid at connect time and, where the kernel tells
    (``SO_PEERGROUPS``, Linux 4.13+), its supplementary groups."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 256)
    except OSError:  # an older kernel, or more than 256 groups: the primary gid only
        return frozenset()
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def private_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` may not hold our socket, or None. A directory named
    ``llm-sidecar-*`` is a per-user one in a shared place such as /tmp: it must be ours
    (this process's uid) and closed to others, or another user who created it first
    could put their own socket there and receive our clients' requests. Other
    directories, and one that does not exist yet, are not judged here."""
    if not directory.name.startswith(PRIVATE_DIR_PREFIX):
        return None
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
        return None
    what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
    return (f"{directory} must be a directory owned by uid {os.getuid()} with mode 0700, "
            f"but it is {what} owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}")


def trusted_uids(path: str, expected_uid: int | None) -> frozenset[int]:
    """The uids a client accepts as the daemon listening on ``path``: root always (it
    could read our traffic anyway); ``expected_uid`` when given, else our own uid and
    the owner of the socket's directory when no one else may write there (the owner
    decides what listens in it: a service user's runtime directory, /run for root)."""
    if expected_uid is not None:
        return frozenset((0, expected_uid))
    uids = {0, os.getuid()}
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return frozenset(uids)
    if not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        uids.add(st.st_uid)
    return frozenset(uids)


def daemon_problem(sock: HasSockopt, path: str, expected_uid: int | None) -> str | None:
    """Why a client must not talk to what it reached at ``path``, or None. Checked right
    after ``connect()``, before the first byte is sent."""
    try:
        if expected_uid is None:
            problem = private_dir_problem(Path(os.path.abspath(path)).parent)
            if problem is not None:
                return f"{problem}; another user may have created it to receive your requests"
        peer = peer_of(sock)
        trusted = trusted_uids(path, expected_uid)
    except OSError as exc:
        return f"cannot check who listens there: {exc}"
    if peer.uid in trusted:
        return None
    return (f"the process listening there (pid {peer.pid}) runs as uid {peer.uid}, "
            f"not as uid {' or '.join(map(str, sorted(trusted)))}")


__all__ = ["Peer", "daemon_problem", "peer_of", "private_dir_problem", "trusted_uids"]
