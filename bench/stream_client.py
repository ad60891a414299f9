"""A lean HTTP/1.1 client for streamed answers: one keep-alive TLS connection, asyncio streams.

For `bench/users_bench`, where a thousand users share two cores with the orchestrators they
measure: httpx spent about half a millisecond of CPU per streamed event here, most of it in
its layers, which took cores from the servers under test. This client only sends a POST,
reads the status and headers, and reads the body (chunked or by length), time-stamping the
first chunk that carries a token; nothing is parsed while the answer streams.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

FIRST_TEXT = re.compile(rb'"text":"[^"]')


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    first: float  # monotonic time of the first chunk with a token (0.0: none)


class StreamClient:
    """One user's connection to one server, reopened when the server closes it."""

    def __init__(self, url: str, verify: ssl.SSLContext, timeout: float = 120.0):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 443, parts.path
        self.tls = verify if parts.scheme == "https" else None
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: dict[str, object], key: str) -> Answer:
        data = orjson.dumps(body)
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()  # fmt: skip
        async with asyncio.timeout(self.timeout):
            if self._writer is None or self._writer.is_closing():
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
            assert self._reader is not None
            self._writer.write(head + data)
            return await self._read(self._reader)

    async def _read(self, reader: asyncio.StreamReader) -> Answer:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        first = 0.0
        if headers.get("transfer-encoding") == "chunked":
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):
                chunk = await reader.readexactly(size + 2)
                if not first and FIRST_TEXT.search(chunk):
                    first = time.monotonic()
                chunks.append(chunk[:-2])
            await reader.readline()  # the empty trailer
            body = b"".join(chunks)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close":
            await self.close()
        return Answer(status, headers, body, first)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
