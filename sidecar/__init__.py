"""llm-sidecar: a host-local guard for every LLM API call an application makes.

Applications talk to the daemon over a Unix socket through ``Client`` (blocking) or
``AsyncClient`` (asyncio); every exception they raise derives from
``sidecar.errors.SidecarError``.
"""
from .client.aio import AsyncClient
from .client.guard import CallResult, Guarded
from .client.sync import Client
from .version import __version__

__all__ = ["AsyncClient", "CallResult", "Client", "Guarded", "__version__"]
