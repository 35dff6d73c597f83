"""The wire protocol: every request and reply as a frozen msgspec Struct; no I/O.

A frame body is a msgpack map tagged by ``op``. Requests form one tagged union decoded by
one typed decoder (``REQUEST_DECODER``); replies form another (``REPLY_DECODER``). Every
request carries an ``id`` (0 to 2**63 - 1) that its reply echoes; an ``Error`` reply to a
frame whose id could not be read has ``id = None``. Unknown map keys are ignored, so a newer
client can talk to an older daemon that lacks a field it only adds.

The scalars and their bounds are in ``values``, the requests in ``requests``, the replies
in ``replies``; this package is their one public namespace (applications also reach it as
``sidecar.protocol``). ``framing`` puts bodies in frames, ``peer`` says who is at the
other end of the socket and ``address`` where the socket is.
"""
from __future__ import annotations

from typing import Union

import msgspec

from .replies import (
    AdmitReply, AlertInfo, BeginReply, BuildInfo, CacheGetReply, CacheInvalidateReply,
    CachePutReply, CacheStats, ChainModel, ClusterStats, CostGroup, CostPeriod, CostsReply,
    CostTotals, CountReply, EndReply, Error, ExtendReply, FingerprintReply, HelloReply,
    HitsReply, LatencyStats, LimitsReply, LimitUse, LogStats, MetricsReply, OpStats, Pong,
    ReleaseReply, Reply, REPLY_TYPES, ReportReply, RouteReply, SettleReply, ShmClientStats,
    ShmStats, SliceEndReply, SliceReply, StatsReply, TierStats,
)
from .requests import (
    Admit, Attempt, Begin, CacheGet, CacheInvalidate, CachePut, CacheRequest, Costs, Count,
    End, Extend, Fingerprint, Hello, Hits, Limits, Message, MetricsText, OPS, Ping, Release,
    Report, Request, REQUEST_TYPES, Route, Settle, ShmHit, Slice, SliceEnd, Stats,
)
from .values import (
    Epoch, ErrorCode, HttpStatus, LeaseId, MAX_EPOCH, MAX_NAME, MAX_SECONDS, MAX_TOKENS,
    MAX_USD, Name, NIL, NIL_RAW, PROTOCOL_VERSION, RequestId, Seconds, Tokens, Usd,
)

REQUEST_DECODER = msgspec.msgpack.Decoder(Union[REQUEST_TYPES])  # type: ignore[valid-type]
REPLY_DECODER = msgspec.msgpack.Decoder(Union[REPLY_TYPES])  # type: ignore[valid-type]


class Envelope(msgspec.Struct):
    """What can still be read of a frame that failed typed decoding: its id and op."""

    id: object = None
    op: object = None


ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)

__all__ = [
    "Hits", "HitsReply", "ShmClientStats", "ShmHit", "ShmStats", "Slice", "SliceEnd",
    "SliceEndReply", "SliceReply",
    "Admit", "AdmitReply", "AlertInfo", "Attempt", "Begin", "BeginReply", "BuildInfo",
    "CacheGet", "CacheGetReply", "CacheInvalidate", "CacheInvalidateReply", "CachePut",
    "CachePutReply", "CacheRequest", "CacheStats", "ChainModel", "ClusterStats",
    "CostGroup", "CostPeriod", "CostTotals", "Costs", "CostsReply", "Count", "CountReply",
    "ENVELOPE_DECODER", "End", "EndReply", "Envelope", "Epoch", "Error", "ErrorCode",
    "Extend", "ExtendReply", "Fingerprint", "FingerprintReply", "Hello", "HelloReply",
    "HttpStatus", "LatencyStats", "LeaseId", "LimitUse", "Limits", "LimitsReply",
    "LogStats", "MAX_EPOCH", "MAX_NAME", "MAX_SECONDS", "MAX_TOKENS", "MAX_USD", "Message",
    "MetricsReply", "MetricsText", "NIL", "NIL_RAW", "Name", "OPS", "OpStats",
    "PROTOCOL_VERSION", "Ping", "Pong", "REPLY_DECODER", "REPLY_TYPES", "REQUEST_DECODER",
    "REQUEST_TYPES", "Release", "ReleaseReply", "Reply", "Report", "ReportReply", "Request",
    "RequestId", "Route", "RouteReply", "Seconds", "Settle", "SettleReply", "Stats",
    "StatsReply", "TierStats", "Tokens", "Usd",
]
