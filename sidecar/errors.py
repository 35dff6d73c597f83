"""The one exception hierarchy of llm-sidecar.

Exceptions are for broken backends, misuse and bad input; decisions (over a limit, cache
miss) are values. Wire errors arrive as ``protocol.Error`` replies and are turned into
``RequestError`` subclasses at one place, ``error_from_reply``.
"""
from __future__ import annotations

from .wire import ErrorCode


class SidecarError(Exception):
    """Base of every exception raised by llm-sidecar."""


class SidecarUnavailable(SidecarError, ConnectionError):
    """No daemon answers on the socket (not started, stopped, or wrong path)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"llm-sidecar daemon unreachable at {path}: {reason}. "
            "Start it with `llm-sidecar serve` (or `systemctl start llm-sidecar`), "
            "or point the client at its socket with socket=... or LLM_SIDECAR_SOCKET."
        )


class UntrustedSocket(SidecarUnavailable):
    """What answers on the socket is not a daemon this client trusts: its per-user
    directory or the process listening there belongs to another user (see
    ``sidecar.wire.peer``). Nothing was sent to it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super(SidecarUnavailable, self).__init__(
            f"refusing the llm-sidecar socket at {path}: {reason}. Nothing was sent. "
            "If that is your daemon's user, pass expected_uid=UID to the client; otherwise "
            "remove the path (the daemon recreates it) or point the client at your "
            "daemon's socket with socket=... or LLM_SIDECAR_SOCKET."
        )


class SidecarTimeout(SidecarError, TimeoutError):
    """The daemon did not answer within the call's timeout."""


class ProtocolError(SidecarError):
    """The peer broke the wire protocol (bad frame, out-of-order reply, bad version)."""


class ConfigError(SidecarError, ValueError):
    """Invalid configuration: names the file, the key and how to fix it."""

    def __init__(self, message: str, *, source: str = "", key: str = "", hint: str = "") -> None:
        self.detail = message
        self.source = source
        self.key = key
        self.hint = hint
        where = ": ".join(p for p in (source, key) if p)
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text} (hint: {hint})"
        super().__init__(text)


class RequestError(SidecarError):
    """The daemon answered a request with an error reply."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 request_id: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.detail = message
        self.request_id = request_id
        super().__init__(f"[{self.code.name}] {message}")


class BadRequest(RequestError):
    """The request was malformed, of an unknown op, or had a missing or mistyped field."""


class InvalidValue(BadRequest, ValueError):
    """A well-typed request asked for something that does not exist or cannot be done."""

    code = ErrorCode.INVALID_VALUE


class UnknownEncoding(InvalidValue):
    """No such tokenizer encoding; the message lists the known ones."""

    code = ErrorCode.UNKNOWN_ENCODING


class Forbidden(RequestError, PermissionError):
    """The daemon's ``[server.access]`` does not let this peer (uid/gid) do that."""

    code = ErrorCode.FORBIDDEN


class FrameTooLarge(RequestError):
    """A frame exceeded the daemon's max frame size; the connection was closed."""

    code = ErrorCode.TOO_LARGE


class Overloaded(RequestError):
    """The daemon refused the connection or request because it is at a configured bound."""

    code = ErrorCode.OVERLOADED


class InternalError(RequestError):
    """A bug or backend failure inside the daemon; the daemon logged the details."""

    code = ErrorCode.INTERNAL


class TokenizerUnavailable(InternalError):
    """An encoding's merge ranks are not installed or failed verification."""


_BY_CODE: dict[ErrorCode, type[RequestError]] = {
    ErrorCode.MALFORMED: BadRequest,
    ErrorCode.UNKNOWN_OP: BadRequest,
    ErrorCode.MISSING_FIELD: BadRequest,
    ErrorCode.WRONG_TYPE: BadRequest,
    ErrorCode.TOO_LARGE: FrameTooLarge,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.INVALID_VALUE: InvalidValue,
    ErrorCode.UNKNOWN_ENCODING: UnknownEncoding,
    ErrorCode.FORBIDDEN: Forbidden,
}


def error_from_reply(code: int, message: str, request_id: int | None) -> RequestError:
    """Build the exception for an ``Error`` reply (unknown codes map to InternalError)."""
    try:
        ecode = ErrorCode(code)
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}", request_id=request_id)
    return _BY_CODE[ecode](message, code=ecode, request_id=request_id)


class JournalError(SidecarError):
    """The journal cannot be used: not a journal file, unsupported version, locked by
    another process, misuse (not open, closed, other event loop), or an I/O error while
    writing (after which the journal refuses appends until it is opened again)."""


class VectorIndexError(SidecarError):
    """The vector index failed: a file that is not an index (or of another dim/dtype),
    or a USearch failure (out of memory, ...). The message names the operation."""


class VectorInputError(VectorIndexError, ValueError):
    """Vectors or keys of the wrong shape, dtype, dimension or memory layout; the message
    says what was expected and how to convert."""


class StoreUnavailable(SidecarError):
    """Cluster mode: Redis did not answer in time, or answered with an error. The daemon
    goes degraded; callers never see it."""


class DaemonStartError(SidecarError):
    """The daemon cannot start: socket owned by a live daemon, unsafe directory, ..."""


class GuardError(SidecarError):
    """A guarded call could not be made (``sidecar.client.guard``)."""


class Denied(GuardError):
    """The sidecar refused the call before it reached a provider: a limit (``reason``
    "limit", "burst" or "retry_loop", naming ``limit``) or no model available ("no_model",
    every circuit open). ``retry_after`` is in seconds, None when no time is promised."""

    def __init__(self, reason: str, limit: str, retry_after: float | None) -> None:
        self.reason = reason
        self.limit = limit
        self.retry_after = retry_after
        when = "" if retry_after is None else f"; retry after {retry_after:g} s"
        super().__init__(f"denied by the sidecar: {reason}"
                         + (f" ({limit})" if limit else "") + when)


class AllAttemptsFailed(GuardError):
    """Every attempt of a guarded call failed, and there was neither a stale cached answer
    nor a static fallback. ``attempts`` lists each (model, status, error)."""

    def __init__(self, attempts: list) -> None:
        self.attempts = attempts
        tried = "; ".join(f"{a.model}: {a.error or a.status}" for a in attempts) or "none"
        super().__init__(f"every attempt failed ({len(attempts)}): {tried}")


class BudgetExhausted(GuardError):
    """A streamed answer was cut because a budget ran out mid-stream; what was received
    was settled."""
