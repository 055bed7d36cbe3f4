"""A fleet's shared counts and limits, decided without sockets: what a process publishes, the Lua
scripts Redis runs atomically, and how the fleet's counts enter a balancing decision.

The runtime (runtime/shared_state.py) talks to Redis; everything it sends and how it reads the
answers is here. The layout in Redis (every key starts with `shared_state.key_prefix`):

- `fleet`: a hash of fleet totals: open sessions per backend (`b|POOL|ADDRESS`), per pool
  (`s|pool|POOL`) and in all (`s|total`);
- `ips`: a hash of open sessions per client address (`i|ADDRESS`), written only when
  `rate_limits.max_sessions_per_ip` is set; never read whole;
- `proc:ID`: one process's own share of those fields (its ledger) plus `#seq`, the sequence
  number of the last write applied;
- `procs`: a sorted set of live processes, scored by the time (Redis's clock, ms) their
  heartbeat runs out;
- `hs|ADDRESS`: the theoretical arrival time of the next handshake from that address (GCRA).

A process writes absolute values of its own counts (never increments), each write carrying a
sequence number, so a write that arrives late is refused (`stale`) rather than undoing a newer
one, and a retried write counts nothing twice. Redis applies the difference to the fleet totals
in the same script. A process whose heartbeat runs out is reaped by the next refresh of any other
process: its ledger is subtracted from the totals and deleted, so a dead process's sessions leave
the fleet within `process_ttl`. A process that comes back after being reaped (or finds Redis
emptied by a restart) is told `resync` and writes all its counts again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from wsproxy.policy.admission import Admission
from wsproxy.policy.balancing import Pool

SEQ = "#seq"
TOTAL = "s|total"

# status words the scripts answer with
OK = "ok"
STALE = "stale"  # a newer write of this process was applied already
RESYNC = "resync"  # this process's ledger is gone: write every count again
OVER = "over"  # a cap would be crossed: nothing written


def backend_field(pool: str, backend: str) -> str:
    return f"b|{pool}|{backend}"


def pool_field(pool: str) -> str:
    return f"s|pool|{pool}"


def ip_field(ip: str) -> str:
    return f"i|{ip}"


@dataclass(frozen=True, slots=True)
class Keys:
    """The Redis keys of one fleet (one key prefix)."""

    prefix: str

    @property
    def fleet(self) -> str:
        return f"{self.prefix}fleet"

    @property
    def ips(self) -> str:
        return f"{self.prefix}ips"

    @property
    def procs(self) -> str:
        return f"{self.prefix}procs"

    @property
    def ledger_prefix(self) -> str:
        return f"{self.prefix}proc:"

    def ledger(self, process: str) -> str:
        return f"{self.ledger_prefix}{process}"

    def handshakes(self, ip: str) -> str:
        return f"{self.prefix}hs|{ip}"


# --- what a process publishes ---------------------------------------------------------------


def local_counts(
    pools: Mapping[str, Pool], admission: Admission, *, ips: Iterable[str] = (), with_ips: bool = False
) -> dict[str, int]:
    """This process's counts as ledger fields: sessions per backend (its leases), per pool and in
    all (its admission tickets), and for `ips` (the addresses whose count changed) per address
    when `with_ips` (only a per-address cap needs them in Redis)."""
    counts = {backend_field(name, b.name): b.active for name, pool in pools.items() for b in pool.backends}
    counts[TOTAL] = admission.total
    for name in pools:
        counts[pool_field(name)] = admission.per_pool.get(name, 0)
    if with_ips:
        for ip in ips:
            counts[ip_field(ip)] = admission.per_ip.get(ip, 0)
    return counts


def changes(published: Mapping[str, int], current: Mapping[str, int], *, full: bool = False) -> dict[str, int]:
    """The fields to write: those whose value differs from what Redis holds for this process, and 0
    for non-address fields it holds that `current` no longer has (a backend removed from the pool).
    Address fields absent from `current` are unchanged, not gone (only changed ones are listed).
    With `full`, every non-zero field of `current` too (after a `resync`)."""
    out = {k: v for k, v in current.items() if published.get(k, 0) != v or (full and v)}
    for k, v in published.items():
        if v and k not in current and not k.startswith("i|"):
            out[k] = 0
    return out


def encode(fields: Mapping[str, int]) -> list[str]:
    """Fields as the scripts' flat ARGV tail: name, value, name, value, ..."""
    out: list[str] = []
    for k, v in fields.items():
        out += [k, str(v)]
    return out


# --- how the fleet's counts enter a balancing decision -----------------------------------------


def merge(pools: Mapping[str, Pool], fleet: Mapping[str, int] | None, published: Mapping[str, int]) -> None:
    """Set each backend's `others`: the sessions other processes hold on it, i.e. the fleet total
    minus this process's own share as Redis holds it. Policies then weigh `active + others`: this
    process's own leases exactly as of now, everyone else's as of the last refresh. `fleet` None
    (Redis unreachable): every backend's `others` is 0, so decisions are this process's alone."""
    for name, pool in pools.items():
        for b in pool.backends:
            if fleet is None:
                b.others = 0
                continue
            field = backend_field(name, b.name)
            b.others = max(0, fleet.get(field, 0) - published.get(field, 0))


def parse_hash(flat: Iterable[object] | Mapping[object, object]) -> dict[str, int]:
    """A Redis hash as returned to a script caller (a flat list or a mapping) to {field: int}."""
    if isinstance(flat, Mapping):
        items = list(flat.items())
    else:
        seq = list(flat)
        items = list(zip(seq[0::2], seq[1::2], strict=True))
    out: dict[str, int] = {}
    for k, v in items:
        key = k.decode() if isinstance(k, bytes) else str(k)
        try:
            out[key] = int(v.decode() if isinstance(v, bytes) else str(v))
        except ValueError:
            continue
    return out


# --- the scripts ------------------------------------------------------------------------------

# Shared by the scripts: which totals hash a field belongs to, and moving a total (fields at 0
# are deleted, so the hashes hold only live counts).
_MOVE = """
local function total_key(field)
  if string.sub(field, 1, 2) == 'i|' then return KEYS[2] end
  return KEYS[1]
end
local function move(field, delta)
  if delta ~= 0 then
    local key = total_key(field)
    if redis.call('HINCRBY', key, field, delta) <= 0 then redis.call('HDEL', key, field) end
  end
end
local function write(ledger, fields, seq)
  for _, pair in ipairs(fields) do
    local field, value = pair[1], pair[2]
    local old = tonumber(redis.call('HGET', ledger, field)) or 0
    move(field, value - old)
    if value == 0 then redis.call('HDEL', ledger, field) else redis.call('HSET', ledger, field, value) end
  end
  redis.call('HSET', ledger, '#seq', seq)
end
"""

# KEYS: fleet, ips, procs, own ledger. ARGV: process id, seq, ttl ms, reap batch, ledger prefix,
# mode ('full' | 'delta'), n, then n field/value pairs. Answers {status, fleet hash}.
SYNC_SCRIPT = (
    _MOVE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, seq, ttl, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, batch)
for _, other in ipairs(dead) do
  if other ~= id then
    local key = ARGV[5] .. other
    local held = redis.call('HGETALL', key)
    for i = 1, #held, 2 do
      if held[i] ~= '#seq' then move(held[i], -tonumber(held[i + 1])) end
    end
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[3], other)
  end
end
local status = 'ok'
local stored = redis.call('HGET', KEYS[4], '#seq')
if not stored and ARGV[6] ~= 'full' then
  status = 'resync'
elseif stored and tonumber(stored) >= seq then
  status = 'stale'
else
  local fields = {}
  for i = 0, tonumber(ARGV[7]) - 1 do fields[i + 1] = {ARGV[8 + 2 * i], tonumber(ARGV[9 + 2 * i])} end
  write(KEYS[4], fields, seq)
end
redis.call('ZADD', KEYS[3], now + ttl, id)
return {status, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: fleet, ips, own ledger. ARGV: seq, n, then n triples field/value/cap (cap -1: none).
# Every capped field's fleet total, with this process's new value in it, must stay within its cap;
# then (and only then) the values are written. A stale write decides on the totals as they are
# (a newer write of this process already carried this session). Answers {status[, field, total]}.
ADMIT_SCRIPT = (
    _MOVE
    + """
local stored = redis.call('HGET', KEYS[3], '#seq')
if not stored then return {'resync'} end
local seq, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local fresh = tonumber(stored) < seq
local fields = {}
for i = 0, n - 1 do
  local field, value, cap = ARGV[3 + 3 * i], tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i])
  local total = tonumber(redis.call('HGET', total_key(field), field)) or 0
  if fresh then total = total + value - (tonumber(redis.call('HGET', KEYS[3], field)) or 0) end
  if cap >= 0 and total > cap then return {'over', field, tostring(total)} end
  fields[i + 1] = {field, value}
end
if not fresh then return {'stale'} end
write(KEYS[3], fields, seq)
return {'ok'}
"""
)

# KEYS: the address's handshake key. ARGV: emission interval (1/rate) and burst * interval, both in
# microseconds. GCRA: a token bucket of `burst` tokens refilled at `rate`, kept as one timestamp,
# the theoretical arrival time (TAT) of the next request. A request fits while the TAT after it is
# at most burst intervals ahead of now; a refused one changes nothing. Redis's clock, so every
# process of the fleet judges on the same time. Answers 0 (allowed) or the microseconds to wait.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next_tat = tat + interval
local over = next_tat - now - limit
if over > 0 then return math.ceil(over) end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return 0
"""

# KEYS: fleet, ips, procs, own ledger. ARGV: process id. A process leaving on purpose takes its
# counts out at once instead of waiting for its heartbeat to run out.
LEAVE_SCRIPT = (
    _MOVE
    + """
local held = redis.call('HGETALL', KEYS[4])
for i = 1, #held, 2 do
  if held[i] ~= '#seq' then move(held[i], -tonumber(held[i + 1])) end
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
)


def gcra_args(rate: float, burst: float) -> list[str]:
    """GCRA_SCRIPT's ARGV for a {rate, burst} limit (microseconds)."""
    interval = 1_000_000 / rate
    return [f"{interval:.3f}", f"{burst * interval:.3f}"]
