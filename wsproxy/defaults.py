"""Every configuration default, in one place.

config.py reads these and docs/configuration.md documents them; no other module may
invent a default of its own, so a reader can find what wsproxy does when a key is absent.
"""

from __future__ import annotations

# timeouts (seconds)
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0

# limits
MAX_HEADER_BYTES = 16384
BUFFER_BYTES = 65536
MAX_RESPONSE_HEADERS_BYTES = 16384  # the backend's answer to our Upgrade request

# pools
BALANCE = "round_robin"
WEIGHT = 1
RETRIES = 2
HASH_BALANCE_FACTOR = 1.25
HASH_FALLBACK = "least_conn"

# listeners
DEFLATE = True

# shutdown: how long SIGINT/SIGTERM waits for sessions to finish their closing handshakes
SHUTDOWN_DEADLINE = 10.0
