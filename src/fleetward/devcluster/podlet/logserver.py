"""The podlet's kubelet-style log endpoint, so that `kubectl logs` works on the podlet node.

`kubectl logs` asks the API server, which calls the node's kubelet at
`https://<InternalIP>:<daemonEndpoints.kubeletEndpoint.Port>/containerLogs/<ns>/<pod>/<container>`
with its kubelet client certificate. This serves that one path (read-only) over TLS with a
serving certificate from the cluster's CA, and answers only the API server's client
identity. Query parameters as the kubelet takes them: `follow`, `previous`, `tailLines`,
`limitBytes`, `timestamps`, `sinceSeconds`, `sinceTime` (line times from the log's times
file, logfile.py).

Why not a library: the kubelet's server is Go and part of the kubelet; nothing on PyPI
serves this API, and it is one path over the standard library's HTTP server.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fleetward.devcluster.podlet.logfile import READ_SIZE, LineTimes, format_time, parse_time

log = logging.getLogger("podlet.logs")

FOLLOW_POLL_SECONDS = 0.2


class LogLookupError(Exception):
    """What was asked for cannot be served; answered with `status` and this text. As the
    kubelet does: 404 for a pod it does not run, 400 for the rest (the API server passes a
    400's text on to `kubectl`, a 404 becomes a generic "not found")."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


# (namespace, pod, container, previous) -> (log file, whether the container still runs)
Lookup = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]]]


@dataclass(frozen=True)
class LogQuery:
    """What of a log to send, from the kubelet's query parameters."""

    tail_lines: int | None = None
    limit_bytes: int | None = None
    since_ns: int | None = None
    timestamps: bool = False
    follow: bool = False

    def start(self, times: LineTimes | None) -> int | None:
        """The offset to start at (None: the end of the file). Both `tailLines` and a
        `since` apply, as on a kubelet: the later start wins."""
        start: int | None = 0
        if times is not None and self.tail_lines is not None:
            start = times.start_of_tail(self.tail_lines)
        if times is not None and self.since_ns is not None and start is not None:
            since = times.start_since(self.since_ns)
            start = None if since is None else max(start, since)
        return start


class _Handler(BaseHTTPRequestHandler):
    server: LogServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # The TLS handshake here, in the connection's own thread (not in accept(), where a
        # slow client would hold up every other), and bounded in time.
        self.request.settimeout(10)
        self.request.do_handshake()
        self.request.settimeout(None)
        super().setup()

    def log_message(self, fmt: str, *args) -> None:  # the podlet's log, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionResetError, TimeoutError) as e:
            log.debug("log request from %s ended: %s", self.address_string(), e)

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        subject = dict(x[0] for x in (peer or {}).get("subject", ()))
        if subject.get("commonName") not in self.server.allowed_users:
            self._refuse(HTTPStatus.FORBIDDEN, f"user {subject.get('commonName')!r} may not read container logs here")
            return
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._refuse(HTTPStatus.NOT_FOUND, "only /containerLogs/<namespace>/<pod>/<container> is served")
            return
        _, namespace, pod, container = parts
        query = urllib.parse.parse_qs(url.query)

        def flag(name: str) -> bool:
            return query.get(name, ["false"])[0].lower() in ("true", "1")

        def number(name: str) -> int | None:
            value = query.get(name, [None])[0]
            if value is None:
                return None
            try:
                return max(0, int(value))
            except ValueError:
                raise LogLookupError(f"{name} must be a whole number, not {value!r}") from None

        def since() -> int | None:
            seconds, moment = number("sinceSeconds"), query.get("sinceTime", [None])[0]
            if seconds is not None:
                return time.time_ns() - seconds * 1_000_000_000
            if moment is None:
                return None
            try:
                return parse_time(moment)
            except ValueError:
                raise LogLookupError(f"sinceTime must be an RFC 3339 time, not {moment!r}") from None

        try:
            ask = LogQuery(
                tail_lines=number("tailLines"),
                limit_bytes=number("limitBytes"),
                since_ns=since(),
                timestamps=flag("timestamps"),
                follow=flag("follow") and not flag("previous"),
            )
            path, running = self.server.lookup(namespace, pod, container, flag("previous"))
        except LogLookupError as e:
            self._refuse(e.status, str(e))
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._stream(path, running, ask)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client went away (kubectl logs -f interrupted)
        self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _stream(self, path: Path, running: Callable[[], bool], ask: LogQuery) -> None:
        sent = 0

        def send(data: bytes) -> bool:
            nonlocal sent
            if ask.limit_bytes is not None:
                data = data[: max(0, ask.limit_bytes - sent)]
            self._chunk(data)
            sent += len(data)
            return ask.limit_bytes is None or sent < ask.limit_bytes

        needs_times = ask.timestamps or ask.tail_lines is not None or ask.since_ns is not None
        times = LineTimes(path) if needs_times else None
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            start = ask.start(times)
            pos = f.seek(end if start is None else min(start, end))
            more = True
            while more:
                # Without follow, what the log held when asked (a chatty container's new
                # lines would otherwise keep the answer going).
                data = f.read(READ_SIZE if ask.follow else min(READ_SIZE, max(0, end - pos)))
                if data:
                    more = send(_stamped(data, pos, times) if ask.timestamps and times else data)
                    pos += len(data)
                    continue
                if not ask.follow or self.server.stopping.is_set() or not running():
                    return  # everything there was sent (and, following, the container ended)
                time.sleep(FOLLOW_POLL_SECONDS)


def _stamped(data: bytes, pos: int, times: LineTimes) -> bytes:
    """`data` (read at offset `pos`) with each line that starts in it prefixed by its time."""
    times.refresh()
    starts = times.starts_between(pos, pos + len(data))
    if not starts:
        return data
    out = [data[: starts[0][0] - pos]]  # the end of a line that started in an earlier read
    for i, (start, ns) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else pos + len(data)
        out.append(format_time(ns).encode() + b" " + data[start - pos : stop - pos])
    return b"".join(out)


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        lookup: Lookup,
        *,
        cert: Path,
        key: Path,
        client_ca: Path,
        allowed_users: tuple[str, ...],
    ) -> None:
        super().__init__((host, port), _Handler)
        self.lookup = lookup
        self.allowed_users = allowed_users
        self.stopping = threading.Event()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        ctx.load_cert_chain(str(cert), str(key))
        ctx.verify_mode = ssl.CERT_REQUIRED  # only clients with a certificate from the cluster's CA
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request, client_address) -> None:
        # A refused handshake (no certificate from the cluster's CA) or a dropped client.
        log.debug("log request from %s failed", client_address, exc_info=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="log-server", daemon=True).start()
        log.info("container logs served on https://%s:%d", *self.server_address[:2])

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
