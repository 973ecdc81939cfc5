"""Connection options and the channels built from them, blocking or asyncio."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

TARGET_ENVIRONMENT = "BALANCE_TARGET"
TARGET_DEFAULT = "127.0.0.1:50051"
TIMEOUT_SECONDS_DEFAULT = 10.0
"""Every call's deadline (each attempt's) unless the caller gives another."""
DOWNLOAD_TIMEOUT_SECONDS_DEFAULT = 600.0
"""A whole report download's deadline: large statements take a while to stream."""
USER_AGENT = "balance-client/1.0.0"

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect; every call carries `metadata`."""

    target: str
    tls: bool
    root_certificates: bytes | None
    channel_options: tuple[tuple[str, Any], ...]
    metadata: Metadata

    @classmethod
    def of(
        cls,
        target: str | None,
        *,
        tls: bool,
        root_certificates: bytes | None,
        access_token: str | None,
        channel_options: Sequence[tuple[str, Any]],
        metadata: Sequence[tuple[str, str]],
    ) -> Connection:
        """Options as the clients take them: target from BALANCE_TARGET (else 127.0.0.1:50051)
        when None; TLS when asked for or when root certificates are given; the access token as
        `authorization: Bearer ...` metadata."""
        extra = tuple((key.lower(), value) for key, value in metadata)
        if access_token:
            extra = (("authorization", f"Bearer {access_token}"), *extra)
        return cls(
            target=target or os.environ.get(TARGET_ENVIRONMENT) or TARGET_DEFAULT,
            tls=tls or root_certificates is not None,
            root_certificates=root_certificates,
            channel_options=(("grpc.primary_user_agent", USER_AGENT), *channel_options),
            metadata=extra,
        )

    def channel(self) -> grpc.Channel:
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.secure_channel(self.target, credentials, options=self.channel_options)
        return grpc.insecure_channel(self.target, options=self.channel_options)

    def aio_channel(self) -> aio.Channel:
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return aio.secure_channel(self.target, credentials, options=self.channel_options)
        return aio.insecure_channel(self.target, options=self.channel_options)


def text_metadata(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """Metadata as a dict of its text entries (binary `-bin` entries left out)."""
    return {key: value for key, value in pairs or () if isinstance(value, str)}
