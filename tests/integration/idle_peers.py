"""The far ends of test_idle_memory.py, in their own process: a WebSocket backend and clients.

They live outside the test's process so that tracemalloc there counts the proxy's allocations
and nothing of theirs. Plain blocking sockets on a few threads (a client connects, upgrades
through the proxy, sends one masked 16-byte message and reads its echo; a backend thread
answers that session's upstream connection with 101 and echoes), every socket with a timeout.
Driven by lines on stdin:

    (prints)  backend PORT
    proxy PORT      the proxy's listening port
    open N          open N more sessions, each echoing one message; prints "opened N"
    close           close every session and exit (stdin EOF does the same)
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAYLOAD = b"idle-session-msg"  # 16 bytes
TIMEOUT = 10.0
WORKERS = 8  # sessions being opened at once (keeps the proxy busy; the order does not matter)


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed during the handshake after {data!r}")
        data += chunk
        if len(data) > 65536:
            raise ConnectionError("handshake head too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    if rest:
        raise ConnectionError(f"unexpected bytes after the head: {rest!r}")
    return head


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed with {n - len(buf)} bytes missing")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One small frame (payload < 126 bytes): opcode and unmasked payload."""
    b0, b1 = read_exact(sock, 2)
    length = b1 & 0x7F
    if length >= 126:
        raise ConnectionError("unexpectedly long frame")
    mask = read_exact(sock, 4) if b1 & 0x80 else b"\0\0\0\0"
    data = read_exact(sock, length)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


def accept_key(head: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return base64.b64encode(hashlib.sha1(value.strip() + GUID).digest())
    raise ConnectionError("no Sec-WebSocket-Key in the upstream request")


def answer_upstream(conn: socket.socket) -> None:
    """One upstream connection from the proxy: 101, then echo the session's one message."""
    conn.settimeout(TIMEOUT)
    head = read_head(conn)
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(head) + b"\r\n\r\n"
    )
    opcode, data = read_frame(conn)
    conn.sendall(bytes([0x80 | opcode, len(data)]) + data)


def serve_backend(listener: socket.socket, n: int, held: list[socket.socket], errors: list[BaseException]) -> None:
    """Accept n upstream connections, answering them on WORKERS threads."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = []
        try:
            for _ in range(n):
                conn, _ = listener.accept()
                held.append(conn)
                futures.append(pool.submit(answer_upstream, conn))
        except OSError as exc:
            errors.append(exc)
        errors.extend(exc for f in futures if (exc := f.exception(TIMEOUT)) is not None)


def open_client(port: int, held: list[socket.socket]) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    held.append(sock)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
    )
    head = read_head(sock)
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no 101 from the proxy: {head[:200]!r}")
    mask = os.urandom(4)
    sock.sendall(bytes([0x82, 0x80 | len(PAYLOAD)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(PAYLOAD)))
    opcode, data = read_frame(sock)
    if (opcode, data) != (2, PAYLOAD):
        raise ConnectionError(f"wrong echo: {opcode} {data!r}")


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.settimeout(TIMEOUT)
    print(f"backend {listener.getsockname()[1]}", flush=True)
    held: list[socket.socket] = []
    proxy_port = 0
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "close":
                break
            if cmd[0] == "proxy":
                proxy_port = int(cmd[1])
            elif cmd[0] == "open":
                n, errors = int(cmd[1]), []
                backend = threading.Thread(target=serve_backend, args=(listener, n, held, errors), daemon=True)
                backend.start()
                with ThreadPoolExecutor(WORKERS) as pool:
                    futures = [pool.submit(open_client, proxy_port, held) for _ in range(n)]
                    errors.extend(exc for f in futures if (exc := f.exception(3 * TIMEOUT)) is not None)
                backend.join(TIMEOUT)
                if errors or backend.is_alive():
                    print(f"failed {errors[:1] or ['backend thread stuck']}", flush=True)
                    return
                print(f"opened {n}", flush=True)
    finally:
        for sock in held:
            sock.close()
        listener.close()


if __name__ == "__main__":
    main()
