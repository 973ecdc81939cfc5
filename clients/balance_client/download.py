"""Saving a streamed CSV download: chunks to a path or a file object, hashed as they arrive and
checked against the server's trailing `x-sha256`. Both clients feed a `Receiver`; only how they
read the stream differs.

A download to a path is written to `<path>.part` and renamed into place only once its checksum
matched, so a path never holds a corrupted or partial file. A download to a file object is
written as it arrives: on a mismatch the caller's file holds bad bytes, and the error says so.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from . import errors
from .models import Download

Destination = str | os.PathLike[str] | BinaryIO
"""A file path, an existing directory (the file gets the server's name in it), or a binary file object."""
Progress = Callable[[int], None]
"""Called after each chunk with the bytes received so far."""

CHECKSUM_HEADER = "x-sha256"
ROW_COUNT_HEADER = "x-row-count"
FILENAME_DEFAULT = "download.csv"
_FILENAME = re.compile(r'filename="?([^";]+)"?')


class Receiver:
    """One attempt at one download. As a context manager it removes the partial file of an
    attempt that did not finish (failed, or to be started over)."""

    def __init__(self, destination: Destination, progress: Progress | None) -> None:
        self.destination = destination
        self.progress = progress
        self.digest = hashlib.sha256()
        self.received_bytes = 0
        self.filename = FILENAME_DEFAULT
        self.path: Path | None = None
        self._partial: Path | None = None
        self._file: BinaryIO | None = None

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._discard()

    def start(self, initial_metadata: Mapping[str, str]) -> None:
        """Names the file from `content-disposition` and opens the destination."""
        self.filename = filename_of(initial_metadata.get("content-disposition", ""))
        if isinstance(self.destination, str | os.PathLike):
            path = Path(self.destination)
            self.path = path / self.filename if path.is_dir() else path
            self._partial = self.path.with_name(self.path.name + ".part")
            self._file = self._partial.open("wb")
        else:
            self._file = self.destination

    def write(self, data: bytes) -> None:
        assert self._file is not None, "start() opens the destination before the first chunk"
        self._file.write(data)
        self.digest.update(data)
        self.received_bytes += len(data)
        if self.progress is not None:
            self.progress(self.received_bytes)

    def finish(self, trailing_metadata: Mapping[str, str]) -> Download:
        """Checks the file against the server's checksum and, for a path, moves it into place."""
        if self._file is None:
            self.start({})  # An empty stream still makes an (empty) file.
        expected = trailing_metadata.get(CHECKSUM_HEADER, "").strip().lower()
        actual = self.digest.hexdigest()
        if expected != actual:
            raise errors.ChecksumMismatch(
                f"{self.filename}: the server's SHA-256 is {expected or 'missing'} but the "
                f"{self.received_bytes} bytes received hash to {actual}"
                + ("" if self.path is not None else "; the file object holds the corrupted data"),
                metadata={"filename": self.filename, "expected": expected, "actual": actual},
            )
        if self._partial is not None and self.path is not None:
            assert self._file is not None
            self._file.close()
            os.replace(self._partial, self.path)
            self._partial = None
        return Download(
            filename=self.filename,
            path=self.path,
            size_bytes=self.received_bytes,
            row_count=int(trailing_metadata.get(ROW_COUNT_HEADER, "0") or 0),
            sha256=actual,
        )

    def _discard(self) -> None:
        if self._partial is not None and self._file is not None:
            self._file.close()
            self._partial.unlink(missing_ok=True)
            self._partial = None


def filename_of(content_disposition: str) -> str:
    """The file name a `content-disposition` header gives, reduced to a bare name so that a
    server cannot make the client write outside the directory it chose."""
    match = _FILENAME.search(content_disposition)
    name = Path(match.group(1).strip()).name if match else ""
    return name if name not in ("", ".", "..") else FILENAME_DEFAULT
