"""Requests to replies: each op calls its component and builds the typed reply.

No sockets and no framing here, so every op can be exercised without a server.
``Handlers`` (``core``) owns the components and the dispatch table; the limits ops are
in ``limits``, their sharing with the cluster in ``cluster``, the guarded-call ops in
``calls``; ``Deferred`` is a reply still being computed off the event loop.
"""
from ._common import Deferred
from .core import Handlers, build_info

__all__ = ["Deferred", "Handlers", "build_info"]
