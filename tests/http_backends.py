"""Plain HTTP/1.1 backends for the HTTP proxying tests: the standard library's threaded
http.server (another HTTP implementation than the h11 the proxy speaks), optionally over TLS.

Each answers by path: `/id` its name, `/echo` the request body, `/chunked` a chunked body,
`/slow` after a pause, `/close` with Connection: close; every request is recorded (method, path,
headers, body, the client port: a new port is a new connection).
"""

from __future__ import annotations

import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    port: int  # the proxy's source port: one per backend connection
    header_lines: list[tuple[str, str]] = field(default_factory=list)  # as sent, repeats included


@dataclass
class HttpBackend:
    name: str
    server: ThreadingHTTPServer
    thread: threading.Thread
    seen: list[Seen] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def connections(self) -> int:
        return len({s.port for s in self.seen})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += handler.rfile.read(size)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def start_http_backend(name: str, *, ssl_context: ssl.SSLContext | None = None) -> HttpBackend:
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _answer(self) -> None:
            body = _read_body(self)
            url = urlsplit(self.path)
            items = list(self.headers.items())
            seen.append(Seen(self.command, self.path, dict(items), body, self.client_address[1], items))
            if url.path == "/chunked":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part in (b"alpha-", b"beta-", b"gamma"):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")
                return
            if url.path == "/slow":
                time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
            if url.path == "/big":
                out = bytes(range(256)) * (int(parse_qs(url.query).get("kib", ["1024"])[0]) * 4)
            elif url.path == "/echo":
                out = body
            else:
                out = f"{name} {self.command} {self.path}".encode()
            self.send_response(int(parse_qs(url.query).get("status", ["200"])[0]))
            self.send_header("Content-Length", str(len(out)))
            self.send_header("X-Backend", name)
            if url.path == "/close":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return HttpBackend(name, server, thread, seen)
