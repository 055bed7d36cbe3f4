"""Every configuration default, in one place.

config.py reads these and docs/configuration.md documents them; no other module may
invent a default of its own, so a reader can find what wsproxy does when a key is absent.
"""

from __future__ import annotations

# timeouts (seconds)
CONNECT_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
IDLE_TIMEOUT: float | None = None  # off
MAX_LIFETIME: float | None = None  # off
MAX_LIFETIME_JITTER = 0.10  # a fraction of max_lifetime

# heartbeat: the proxy's own pings on silent legs
HEARTBEAT_INTERVAL: float | None = 20.0
HEARTBEAT_TIMEOUT = 10.0
HEARTBEAT_LEGS = "both"

# limits
MAX_HEADER_BYTES = 16384
BUFFER_BYTES = 65536
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SLOW_CONSUMER_TIMEOUT: float | None = None  # off

# pools
BALANCE = "round_robin"
WEIGHT = 1
RETRIES = 2
HASH_BALANCE_FACTOR = 1.25
HASH_FALLBACK = "least_conn"

# listeners
DEFLATE = True
RELAY = "passthrough"

# shutdown: how long SIGINT/SIGTERM waits for sessions to finish their closing handshakes
SHUTDOWN_DEADLINE = 10.0
