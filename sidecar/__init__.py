"""llm-sidecar: a host-local guard for every LLM API call an application makes.

Applications talk to the daemon over a Unix socket through ``Client`` (blocking) or
``AsyncClient`` (asyncio); every exception they raise derives from
``sidecar.errors.SidecarError``.
"""
__version__ = "0.1.0"

from .client.aio import AsyncClient  # noqa: E402
from .client.sync import Client  # noqa: E402
from .client.guard import CallResult, Guarded  # noqa: E402

__all__ = ["AsyncClient", "CallResult", "Client", "Guarded", "__version__"]
