//! The Lua scripts that decide in Redis. Each touches the keys of one slot only (one client,
//! or the global set), reads the time from the Redis clock (`TIME`) so instances with skewed
//! clocks agree, and checks every limit before it writes anything: a refused tunnel leaves
//! no lease and spends no new-tunnel token. Called by hash (`EVALSHA`); `redis::Script`
//! loads them again when a restarted Redis answers `NOSCRIPT`.

use std::sync::LazyLock;

use redis::Script;

/// What the admit script answers: `{code, retry_after_ms}`.
pub(super) mod code {
    pub const ADMITTED: i64 = 0;
    pub const CLIENT_CAP: i64 = 1;
    pub const ROUTE_CAP: i64 = 2;
    pub const RATE: i64 = 3;
}

/// One client's admission. KEYS: the client's lease set, its rate key, and (only when the
/// route has a cap) its lease set on the route. ARGV: lease id, lease ttl (ms), client cap,
/// route cap (0 = none), GCRA emission interval (ms, 0 = no rate), burst.
///
/// Leases whose expiry has passed are dropped first (a dead instance's come back so);
/// then the caps, then the GCRA (theoretical arrival time in `rate`, standard form: admit
/// when `max(tat, now) + T - burst*T <= now`); only when all pass are the leases added and
/// the new arrival time stored. Each set expires a while after its last lease would, so a
/// client gone quiet leaves no key behind.
pub(super) static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, ttl = ARGV[1], tonumber(ARGV[2])
local cap, rcap = tonumber(ARGV[3]), tonumber(ARGV[4])
local interval, burst = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then return {1, 0} end
if KEYS[3] then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if rcap > 0 and redis.call('ZCARD', KEYS[3]) >= rcap then return {2, 0} end
end
local tat
if interval > 0 then
  tat = tonumber(redis.call('GET', KEYS[2])) or now
  if tat < now then tat = now end
  tat = tat + interval
  local allow_at = tat - burst * interval
  if allow_at > now then return {3, math.ceil(allow_at - now)} end
  redis.call('SET', KEYS[2], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
end
redis.call('ZADD', KEYS[1], now + ttl, id)
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
if KEYS[3] then
  redis.call('ZADD', KEYS[3], now + ttl, id)
  redis.call('PEXPIRE', KEYS[3], 2 * ttl)
end
return {0, 0}
"#,
    )
});

/// A lease in one set under a cap (the global one). KEYS: the set. ARGV: lease id, ttl (ms),
/// cap. Answers 1 when taken, 0 when the set is full.
pub(super) static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return 1
"#,
    )
});

/// A bandwidth grant: `n` byte cells from a client's fleet-wide GCRA bucket (one per
/// direction, `vg:{client}:bw:up|down`). KEYS: the bucket. ARGV: cells wanted, emission
/// interval (ms per cell), burst (cells). Answers `{granted, retry_after_ms}`: all `n` or none,
/// so an instance never holds a sliver it cannot use; and after a grant, when the next one of
/// `n` fits if nobody else takes any, so the instance does not ask before (an ask sure to be
/// refused was every other call: 20 calls a second per saturated client, not 10).
pub(super) static GRANT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + n * interval
local allow_at = new_tat - burst * interval
if allow_at > now then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
local next_at = new_tat + n * interval - burst * interval
if next_at < now then next_at = now end
return {n, math.ceil(next_at - now)}
"#,
    )
});

/// Gives unspent cells back to a client's bucket (an instance whose tunnels went idle), so
/// the other instances may use them. KEYS: the bucket. ARGV: cells, emission interval (ms).
/// Never moves the bucket's time before now: returned credit cannot build a burst.
pub(super) static GIVE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
return 1
"#,
    )
});
