"""A Fleet-only gateway in front of a SuperLink (``ecavg deploy gateway``).

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), its Control API (``flwr run``, ``flwr supernode
register``, ...) and its ServerApp Runtime API on one HTTPS port, and the open-source SuperLink authenticates
nobody on the Control API. So whoever can reach that port can register SuperNodes and submit runs; an edge host
holding only ``ca.crt`` included. The gateway closes that hole without touching Flower: the SuperLink listens on
loopback only (``--host 127.0.0.1``), and the gateway, listening on the address the edges use, terminates TLS
with the SuperLink's certificate and forwards only ``POST /v1/fleet/<method>`` requests to it (over TLS again,
verified with the CA). Every other request is answered ``403`` and logged. Operators use the SuperLink's own
port, on the server host or through an SSH tunnel.

The SuperNodes speak HTTP/1.1 with unary requests that carry a ``Content-Length``; requests with any other framing
(``Transfer-Encoding``, several lengths) are refused, so that the gateway and the SuperLink cannot disagree on
where a request ends. Client-supplied ``Forwarded``/``X-Forwarded-*`` headers are dropped and the edge's address
is passed on in ``X-Forwarded-For`` (uvicorn trusts it from 127.0.0.1), so the SuperLink's access log names edges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

from ecavg.errors import DeployError

log = logging.getLogger("ecavg")

FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]*")  # Flower's Fleet API methods, e.g. /v1/fleet/pull-messages
MAX_HEAD_BYTES = 64 * 1024
COPY_CHUNK = 1 << 20
# The reason phrase is what `flwr` shows an edge host that tries the Control API through the gateway.
REFUSAL_PHRASE = "Refused: this gateway forwards only the Fleet API"
DROPPED_HEADERS = {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}


class BadRequest(Exception):
    """A request the gateway refuses: (HTTP status, reason for the log and the client)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Head:
    start_line: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def wants_close(self) -> bool:
        return any("close" in v.lower() for v in self.values("connection"))


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The request or status line and headers; None when the peer closed the connection between messages."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise BadRequest(400, "connection closed inside a message head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, f"message head larger than {MAX_HEAD_BYTES} bytes") from None
    try:
        lines = raw[:-4].decode("latin-1").split("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "undecodable message head") from None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[:1] in " \t":
            raise BadRequest(400, f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return Head(lines[0], headers)


def body_length(head: Head) -> int:
    """The Content-Length of a request, refusing every framing the SuperLink might read differently."""
    if head.values("transfer-encoding"):
        raise BadRequest(411, "requests with Transfer-Encoding are not forwarded; send a Content-Length")
    lengths = head.values("content-length")
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        raise BadRequest(400, "one numeric Content-Length is required")
    return int(lengths[0]) if lengths else 0


def check_request(head: Head) -> None:
    """Only ``POST /v1/fleet/<method> HTTP/1.1`` passes."""
    parts = head.start_line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, f"malformed request line {head.start_line[:80]!r}")
    method, target, _ = parts
    if method != "POST" or not FLEET_PATH.fullmatch(target):
        raise BadRequest(403, f"{method} {target[:120]} refused: this gateway forwards only the Fleet API "
                              "(POST /v1/fleet/...); the Control API is for operators on the SuperLink's host")


async def copy_exact(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> None:
    while length > 0:
        chunk = await reader.read(min(length, COPY_CHUNK))
        if not chunk:
            raise ConnectionError("connection closed inside a message body")
        writer.write(chunk)
        await writer.drain()
        length -= len(chunk)


async def copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay a chunked body (a response of the SuperLink) as it is, up to and including its last chunk."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        writer.write(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the empty line
                line = await reader.readuntil(b"\r\n")
                writer.write(line)
                if line == b"\r\n":
                    break
            await writer.drain()
            return
        await copy_exact(reader, writer, size + 2)  # the chunk and its CRLF


def encode_head(head: Head, extra: list[tuple[str, str]] = ()) -> bytes:
    lines = [head.start_line, *(f"{k}: {v}" for k, v in head.headers), *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class FleetGateway:
    """Listens on ``listen`` (host, port) with the SuperLink's certificate; forwards the Fleet API to ``upstream``."""

    listen: tuple[str, int]
    upstream: tuple[str, int]
    server_context: ssl.SSLContext
    upstream_context: ssl.SSLContext

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        peer = client_writer.get_extra_info("peername") or ("?", 0)
        upstream_reader: asyncio.StreamReader | None = None
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    head = await read_head(client_reader)
                    if head is None:
                        return
                    check_request(head)
                    length = body_length(head)
                except BadRequest as refusal:
                    log.warning("gateway: refused a request from %s: %s", peer[0], refusal)
                    body = (str(refusal) + "\n").encode()
                    client_writer.write(f"HTTP/1.1 {refusal.status} {REFUSAL_PHRASE}\r\nContent-Type: text/plain\r\n"
                                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                    await client_writer.drain()
                    return
                if upstream_reader is None or upstream_writer is None:
                    upstream_reader, upstream_writer = await asyncio.open_connection(
                        *self.upstream, ssl=self.upstream_context, limit=MAX_HEAD_BYTES)
                head.headers = [(k, v) for k, v in head.headers if k.lower() not in DROPPED_HEADERS]
                upstream_writer.write(encode_head(head, [("X-Forwarded-For", str(peer[0]))]))
                await copy_exact(client_reader, upstream_writer, length)
                response = await read_head(upstream_reader)
                if response is None:
                    raise ConnectionError("the SuperLink closed the connection without answering")
                client_writer.write(encode_head(response))
                if any("chunked" in v.lower() for v in response.values("transfer-encoding")):
                    await copy_chunked(upstream_reader, client_writer)
                elif response.values("content-length"):
                    await copy_exact(upstream_reader, client_writer, int(response.values("content-length")[0]))
                else:  # no framing: the body ends with the connection
                    while chunk := await upstream_reader.read(COPY_CHUNK):
                        client_writer.write(chunk)
                    await client_writer.drain()
                    return
                await client_writer.drain()
                if head.wants_close() or response.wants_close():
                    return
        except (BadRequest, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError, ValueError) as error:
            # BadRequest/ValueError here: a SuperLink answer the gateway cannot frame; the connection is dropped.
            log.info("gateway: connection from %s ended: %s", peer[0], error or type(error).__name__)
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await writer.wait_closed()

    async def serve(self, started: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self.handle, *self.listen, ssl=self.server_context, limit=MAX_HEAD_BYTES)
        addresses = ", ".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in server.sockets)
        log.info("gateway: forwarding the Fleet API from %s to the SuperLink at %s:%d", addresses, *self.upstream)
        if started is not None:
            started.set()
        async with server:
            await server.serve_forever()


def split_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


def make_gateway(listen: str, superlink: str, *, certfile: str | Path, keyfile: str | Path,
                 root_certificates: str | Path) -> FleetGateway:
    """A gateway listening on ``listen`` (HOST:PORT) with the SuperLink's certificate, forwarding to ``superlink``
    (HOST:PORT, normally 127.0.0.1:<the SuperLink's --port>) verified with the CA in ``root_certificates``."""
    try:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(str(certfile), str(keyfile))
        upstream_context = ssl.create_default_context(cafile=str(root_certificates))
    except (OSError, ssl.SSLError) as e:
        raise DeployError(f"the gateway's certificates cannot be loaded: {e}") from None
    return FleetGateway(split_address(listen, "--listen"), split_address(superlink, "--superlink"),
                        server_context, upstream_context)


def run_gateway(gateway: FleetGateway) -> None:
    """Serve until SIGINT or SIGTERM."""

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await gateway.serve()

    try:
        asyncio.run(main())
    except OSError as e:  # the listening address is taken or not on this host
        raise DeployError(f"the gateway cannot listen on {gateway.listen[0]}:{gateway.listen[1]}: {e}") from None
    log.info("gateway: stopped")
