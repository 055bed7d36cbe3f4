"""The WebSocket and HTTP protocol core, sans I/O: the frame codec (one, for both relays), the
handshake decisions, the PROXY protocol, the two relays (bytes in, bytes to send and events out),
per-hop deflate and the heartbeat schedule. Time arrives as `now`; nothing here waits."""
