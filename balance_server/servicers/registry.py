"""Registers servicers with request parsing of the service's own: bytes that are no request
message reach the servicer as a MalformedRequest, which the edge refuses as INVALID_ARGUMENT. With
the generated registration, grpc parses them itself and answers UNKNOWN with a Python class name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message, message_factory
from grpc import aio


@dataclass(frozen=True)
class MalformedRequest:
    """What arrives instead of a request whose bytes did not parse."""

    problem: str


def add_service(server: aio.Server, servicer: object, service: descriptor.ServiceDescriptor) -> None:
    """Serves every method of `service` with the servicer's method of the same name."""
    handlers = {}
    for method in service.methods:
        parse = _lenient(message_factory.GetMessageClass(method.input_type))
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                behavior, request_deserializer=parse, response_serializer=_serialize
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                behavior, request_deserializer=parse, response_serializer=_serialize
            )
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _lenient(request_class: type[message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> message.Message | MalformedRequest:
        try:
            return request_class.FromString(data)
        except message.DecodeError as error:
            return MalformedRequest(str(error))

    return parse


def _serialize(response: message.Message) -> bytes:
    return response.SerializeToString()
