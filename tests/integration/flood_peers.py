"""The far ends of test_fairness.py's flood, in their own process (so they never yield to the
proxy's scheduler): a sink backend that answers the Upgrade and drops everything, and a client
that upgrades through the proxy and then writes one masked 64 KiB frame after another.

    python -m tests.integration.flood_peers PORT_FILE SECONDS

It writes the sink's port to PORT_FILE, then waits for PORT_FILE.go to hold the proxy's port.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import sys
import threading
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    return head


def sink(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    head = _read_head(conn)
    key = next(
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    try:
        while conn.recv(1 << 20):
            pass
    except OSError:
        pass


def flood(proxy_port: int, seconds: float) -> None:
    sock = socket.create_connection(("127.0.0.1", proxy_port))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /flood HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = _read_head(sock)
    assert b" 101 " in head.split(b"\r\n", 1)[0], head
    size = 64 << 10
    frame = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", size) + b"\0\0\0\0" + bytes(size)  # mask 0: payload as is
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            sock.sendall(frame)
    except OSError:
        pass
    sock.close()


def main() -> None:
    port_file, seconds = sys.argv[1], float(sys.argv[2])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    threading.Thread(target=sink, args=(listener,), daemon=True).start()
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file + ".go") and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(port_file + ".go") as f:
        proxy_port = int(f.read())
    flood(proxy_port, seconds)


if __name__ == "__main__":
    main()
