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
HTTP_IDLE_TIMEOUT = 60.0  # a keep-alive client connection waiting for its next request
HTTP_RESPONSE_TIMEOUT = 60.0  # a backend's response head (and each body read) to a plain request: long polls

# heartbeat: the proxy's own pings on silent legs
HEARTBEAT_INTERVAL: float | None = 20.0
HEARTBEAT_TIMEOUT = 10.0
HEARTBEAT_LEGS = "both"

# limits
MAX_HEADER_BYTES = 16384
BUFFER_BYTES = 65536
# passthrough, plain sockets on both legs, Linux: the payload of a data frame of at least this many
# bytes crosses the proxy through a kernel pipe (os.splice), never copied into Python; measured to
# pay from about 128 KiB (docs/performance.md "Issue 22: splice"); None: always copy
SPLICE_MIN_BYTES: int | None = 131072
SPLICE_MAX_PIPES = 256  # kernel pipes in use at once for splicing (2 descriptors each); past it: copy
SPLICE_IDLE_PIPES = 32  # empty pipes kept for reuse by the readiness loop
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SLOW_CONSUMER_TIMEOUT: float | None = None  # off
MAX_SESSIONS: int | None = None  # off: global, per pool (pools.NAME.max_sessions), per backend
RETRY_AFTER = 1.0  # seconds, in the Retry-After of a 503 for a session cap
MAX_BODY_BYTES = 16 * 1024 * 1024  # a plain HTTP request's body; over it: 413

# rate_limits (edge protection; see docs/security.md): all off unless configured
HANDSHAKES_PER_IP = None  # {rate, burst}: a new client request takes one token; none left: 429
MAX_SESSIONS_PER_IP: int | None = None  # over it: 429
MESSAGE_RATE = None  # {rate, burst}: client-to-backend messages per session; over it: backpressure
BYTE_RATE = None  # {rate, burst}: client-to-backend bytes per session; over it: backpressure
RATE_CLOSE_AFTER: float | None = 10.0  # continuously over a session rate this long: close 1008
MAX_TRACKED_IPS = 100_000  # per-IP handshake buckets kept; the least recently seen is forgotten

# auth before the upgrade (per listener / route `auth:`)
AUTH_TIMEOUT = 2.0
AUTH_PASS_HEADERS = ("authorization", "cookie")
AUTH_CACHE: float | None = None  # off: ask the auth service for every handshake
AUTH_CACHE_ENTRIES = 10_000
AUTH_SESSION_EXPIRY_HEADER: str | None = None  # off: sessions outlive their credentials
AUTH_RECHECK_BEFORE: float | None = None  # off: a session closes (1008) when its credentials expire
AUTH_EXPIRY_SPREAD = 5.0  # seconds: expiries and rechecks land at a random point this far before the time

# admission: the storm shield (a budget of new upgrades; over it 503 with a spread Retry-After)
ADMISSION_UPGRADES = None  # {rate, burst}: off
ADMISSION_RETRY_AFTER_SPREAD = 10.0  # seconds: Retry-After drawn at random in 1..this
STORM_LOG_INTERVAL = 1.0  # seconds: refusals are summed and logged at most this often

# observability: reconnect waves
RECONNECT_WINDOW = 60.0  # a new session within this long after the same client's close is a reconnect
RECONNECT_CLIENTS = 100_000  # recent closes remembered (a bounded table: the oldest is forgotten)
HISTORY_INTERVAL = 5.0  # seconds between the status page's chart samples
HISTORY_SPAN = 900.0  # seconds of chart history kept (15 minutes)
HISTORY_MAX_SERIES = 64  # pools + backends charted at most; further ones are left out of the charts

# runtime control (admin write API, `wsproxy ctl`)
ADMIN_TOKEN_FILE = None  # off: no write API
ADMIN_TOKEN_ENV = None
ADMIN_MAX_TOKEN_BYTES = 4096  # a token file longer than this is refused
SESSIONS_PAGE = 100  # GET /sessions: rows per page unless `limit` says otherwise
SESSIONS_PAGE_MAX = 1000  # ... and never more than this
CONTROL_MAX_SPREAD = 3600.0  # seconds: the longest spread a close or rebalance may ask for
CTL_TIMEOUT = 10.0  # seconds `wsproxy ctl` waits for each admin listener

# binary upgrades (`wsproxy upgrade`, SIGUSR2)
UPGRADE_READY_TIMEOUT = 30.0  # seconds the old process waits for its successor to accept

# pools
BALANCE = "round_robin"
WEIGHT = 1
RETRIES = 2
HASH_BALANCE_FACTOR = 1.25
HASH_FALLBACK = "least_conn"

# pools: plain HTTP requests, affinity, TLS to backends
HTTP_POOL_MAX_IDLE = 16  # idle backend connections kept per backend
HTTP_POOL_IDLE_TIMEOUT = 30.0  # an idle backend connection older than this is closed
STICKY_COOKIE = "wsproxy_affinity"
STICKY_MAX_AGE: float | None = None  # a session cookie
STICKY_SECURE = "auto"  # Secure when the client spoke TLS to the listener
STICKY_HTTP_ONLY = True
STICKY_SAME_SITE = "lax"
BACKEND_TLS_VERIFY = True  # verify: false is allowed, and warned about at start

# the relay's readiness loop (runtime/reactor.py): watcher calls per round before it yields to
# trio, so handshakes, health checks and the admin listener never wait behind a long round
REACTOR_ROUND_BUDGET = 0.002  # seconds

# listeners
DEFLATE = True
RELAY = "passthrough"
HTTP_MODE = "proxy"  # requests that are not an Upgrade go to the pool (reject: 426)
# connections the kernel queues for a listener before wsproxy accepts them: a reconnect storm
# arrives faster than any accept loop, and a SYN the queue drops is retried by the client only after
# 1, 3, 7, 15 s (the kernel caps this at net.core.somaxconn, 4096 on current Linux)
LISTEN_BACKLOG = 4096
ADMIN_LISTEN_BACKLOG = 128  # the admin API and status page: a few operators and scrapers
TRUSTED_PROXIES = ()  # no peer's X-Forwarded-For / Forwarded / X-Real-IP is believed

# shutdown (SIGTERM): sessions get 1001 spread over the drain window; at the deadline the rest are cut
SHUTDOWN_DEADLINE = 40.0
SHUTDOWN_DRAIN_WINDOW = 30.0

# reload (SIGHUP): sessions on removed backends get 1012 spread over this window
RELOAD_DRAIN_WINDOW = 30.0

# processes serving the listeners (SO_REUSEPORT); "auto" in the config means the CPU count
WORKERS = 1

# active health checks (pools.NAME.health): they run only when that mapping is present
HEALTH_INTERVAL = 2.0
HEALTH_TIMEOUT = 1.0  # never more than the interval: min(HEALTH_TIMEOUT, interval) when not given
HEALTH_RISE = 2
HEALTH_FALL = 3
HEALTH_CHECK = "tcp"  # the one check every backend passes without knowing about it
HEALTH_PATH = "/"
HEALTH_SLOW_START: float | None = None  # off

# passive health (pools.NAME.passive): failed connects/handshakes of real sessions eject a backend
PASSIVE_FAILURES = 3
PASSIVE_WINDOW = 10.0
PASSIVE_EJECT_FOR = 30.0
PASSIVE_MAX_EJECT_FOR = 300.0  # the cap of the doubling for repeat offenders

# a backend marked down by the active checks: close its sessions (1012) spread over the window?
CLOSE_SESSIONS_ON_DOWN = False
DOWN_DRAIN_WINDOW = 10.0

# admin listener (admin: {address}): off when absent; only loopback unless allow_remote is true
ADMIN_ALLOW_REMOTE = False
ADMIN_HOSTS = ()  # Host header names the admin listener answers besides its own address and localhost
# fixed bounds of the admin HTTP server (not configurable): one small request per connection
ADMIN_MAX_REQUEST_BYTES = 8192
ADMIN_TIMEOUT = 5.0  # seconds for reading the request and sending the response
ADMIN_MAX_CONNECTIONS = 32  # at once; further admin connections are closed at once

# the proxy's own descriptors (fixed, not configurable; see docs/operations.md)
DESCRIPTOR_BASE = 32  # stdio, the epoll instances, the spare descriptor, log files: besides sessions
DESCRIPTOR_RESERVE_FRACTION = 0.05  # of RLIMIT_NOFILE, kept back from new sessions
DESCRIPTOR_RESERVE_MIN = 16
DESCRIPTOR_RESERVE_MAX = 512
LOCAL_SHORTAGE_RETRY_AFTER = 1  # seconds, in the Retry-After of a 503 for the proxy's own shortage
LOCAL_SHORTAGE_LOG_QUIET = 10.0  # seconds without a shortage that end a burst (one log line per burst)

# logging (log: {format, level})
LOG_FORMAT = "text"
LOG_LEVEL = "info"
LOG_QUERY = "redact"  # query values in logged targets (logs, /status, /status.json) become ***

# a fleet (shared_state: {redis}): counts, caps and rate limits shared through Redis; off when absent
SHARED_STATE_KEY_PREFIX = "wsproxy:"
SHARED_STATE_TIMEOUT = 0.25  # seconds a Redis call may take before this process decides alone
SHARED_STATE_REFRESH = 0.1  # seconds between publishing own counts and reading the fleet's (at most 0.1)
SHARED_STATE_PROCESS_TTL = 3.0  # a process silent this long is gone: its counts leave the fleet totals
SHARED_STATE_MAX_CONNECTIONS = 8  # fixed: Redis connections per process (coredis pool)
SHARED_STATE_REAP_BATCH = 16  # fixed: dead processes cleared per refresh script

# backends from DNS (pools.NAME.discovery.dns)
DISCOVERY_TYPE = "SRV"
DISCOVERY_INTERVAL = 5.0  # the shortest time between lookups (a lower TTL waits this long)
DISCOVERY_MAX_INTERVAL = 60.0  # the longest (a higher TTL is cut to this)
DISCOVERY_TIMEOUT = 2.0  # one lookup, every query of it included
DISCOVERY_MAX_BACKENDS = 512  # fixed: more records than this in one answer are cut (sorted, first kept)
DNS_PORT = 53
