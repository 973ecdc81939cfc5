"""Helpers for asserting on gRPC errors and their google.rpc details."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc import aio
from grpc_status import rpc_status


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)


def failure_of(error: aio.AioRpcError) -> Failure:
    failure = Failure(error.code(), error.details() or "")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return failure
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            failure.reason, failure.domain, failure.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            failure.fields = [violation.field for violation in bad_request.field_violations]
    return failure


async def fails(call: Awaitable[Any]) -> Failure:
    """The failure of an RPC that must fail."""
    try:
        response = await call
    except aio.AioRpcError as error:
        return failure_of(error)
    raise AssertionError(f"the call succeeded: {response}")
