"""The application side: ``Client`` (blocking), ``AsyncClient`` (asyncio) and the
guarded-call policy they share (fallbacks, retries, the cache around a provider call)."""
