"""The Lua scripts the cluster runs in Redis (registered once, run by SHA).

Every script reads the clock with Redis ``TIME``, never the daemon's, and touches only the
keys of one limit counter: ``KEYS[1]`` its usage hash (slot -> amount: a bucket index of a
sliding window, or the start of a calendar period) and ``KEYS[2]`` its lease hash (daemon
id -> its open lease ``slot granted reported expires seq found``; ``a:<daemon>`` -> the
last adjustment batch applied; ``c:<daemon>`` -> the number of its last close). Both keys share a hash tag, so in a Redis Cluster they live on
one node. Every write refreshes both keys' TTL, so a counter nobody touches disappears.

Window arguments, common to every script: ``kind`` ("s" sliding, "c" calendar), ``span``
(seconds per bucket, sliding), ``buckets`` (per window), ``pstart`` and ``pend`` (the
calendar period the daemon believes is current; the script checks it against ``TIME``),
``keep`` (key TTL, seconds).
"""

#: Shared prelude: clock, window, expired-lease reclaim and the window's use.
_PRELUDE = r"""
local usage, leases = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sliding = ARGV[1] == 's'
local span, nb = tonumber(ARGV[2]), tonumber(ARGV[3])
local pstart, pend, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local slot, oldest
if sliding then
  slot = math.floor(now / span)
  oldest = slot - nb + 1
else
  if now < pstart or now >= pend then
    return {'period', tostring(now)}
  end
  slot = pstart
  oldest = pstart
end

local function fields(v)
  local out = {}
  for x in string.gmatch(v, '%S+') do out[#out + 1] = tonumber(x) end
  return out
end

-- a lease not renewed in time belongs to a dead or stuck daemon: what it did not report
-- as used goes back to the pool, and the lease shrinks to what was reported (expires -1:
-- reclaimed), so that when a stuck owner closes it, the use it had not reported is
-- charged then, exactly
local function reclaim()
  local all = redis.call('HGETALL', leases)
  for i = 1, #all, 2 do
    local d = all[i]
    if string.sub(d, 2, 2) ~= ':' then  -- not an a: or c: mark
      local l = fields(all[i + 1])
      if l[4] >= 0 and l[4] < now then
        local unused = l[2] - l[3]
        if unused > 0 and l[1] >= oldest then
          redis.call('HINCRBY', usage, l[1], -unused)
        end
        redis.call('HSET', leases, d,
                   string.format('%d %d %d -1 %d %d', l[1], l[3], l[3], l[5], l[6]))
      end
    end
  end
end

local function used_now()
  local all = redis.call('HGETALL', usage)
  local used = 0
  for i = 1, #all, 2 do
    local s = tonumber(all[i])
    if s < oldest then
      redis.call('HDEL', usage, all[i])
    elseif s <= slot then
      used = used + tonumber(all[i + 1])
    end
  end
  return used
end

local function touch()
  redis.call('EXPIRE', usage, keep)
  redis.call('EXPIRE', leases, keep)
end
"""

#: ``acquire``: close the caller's open lease (``reported`` is its final use; the rest
#: returns) and, unless ``want`` is 0, open a new one of at least ``want`` (up to
#: ``hint``, at most the remaining amount over ``divisor`` x ``live`` daemons). A replay of
#: the same ``seq`` answers the lease it opened without charging again.
#: ARGV after the window: daemon, seq, amount, want, hint, divisor, live, ttl, reported.
#: Returns {'ok', slot, granted, now, used, found} | {'deny', used, retry_after, now,
#: found} | {'closed', now, found} | {'period', now}; ``found`` is 1 when the caller's
#: previous lease was still there to close (0: it had been reclaimed, returning all its
#: unreported part).
ACQUIRE = _PRELUDE + r"""
local daemon, seq = ARGV[7], tonumber(ARGV[8])
local amount, want, hint = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local divisor, live = tonumber(ARGV[12]), tonumber(ARGV[13])
local ttl, reported = tonumber(ARGV[14]), tonumber(ARGV[15])
local mine = redis.call('HGET', leases, daemon)
local found = 0
if mine then
  local l = fields(mine)
  if l[5] == seq then
    return {'ok', tostring(l[1]), l[2], tostring(now), 0, l[6]}
  end
  -- closing (a reclaimed lease too): a negative "unused" charges use never reported
  local unused = l[2] - reported
  if unused ~= 0 and l[1] >= oldest then
    redis.call('HINCRBY', usage, l[1], -unused)
  end
  redis.call('HDEL', leases, daemon)
  found = 1
elseif want <= 0 and tonumber(redis.call('HGET', leases, 'c:' .. daemon) or '-1') == seq then
  return {'closed', tostring(now), 1}  -- a replayed close: it was applied
end
reclaim()
local used = used_now()
if want <= 0 then
  redis.call('HSET', leases, 'c:' .. daemon, seq)
  touch()
  return {'closed', tostring(now), found}
end
local remaining = amount - used
if remaining < want then
  local wait = -1
  if sliding then
    local all = redis.call('HGETALL', usage)
    local slots = {}
    for i = 1, #all, 2 do slots[#slots + 1] = {tonumber(all[i]), tonumber(all[i + 1])} end
    table.sort(slots, function(a, b) return a[1] < b[1] end)
    local freed = 0
    for _, s in ipairs(slots) do
      freed = freed + s[2]
      if remaining + freed >= want then
        wait = (s[1] + nb) * span - now
        break
      end
    end
  else
    wait = pend - now
  end
  touch()
  return {'deny', used, tostring(wait), tostring(now), found}
end
local share = math.floor(remaining / (divisor * math.max(live, 1)))
local grant = math.max(want, math.min(hint, share))
if grant > remaining then grant = remaining end
redis.call('HINCRBY', usage, slot, grant)
redis.call('HSET', leases, daemon,
           string.format('%d %d 0 %.6f %d %d', slot, grant, now + ttl, seq, found))
touch()
return {'ok', tostring(slot), grant, tostring(now), used + grant, found}
"""

#: ``report``: the caller's open lease has been used up to ``reported``; renew it for
#: ``ttl`` seconds. ARGV after the window: daemon, reported, ttl.
#: Returns {'ok', now} | {'gone', now} (reclaimed: the caller must stop using it, and
#: close it).
REPORT = _PRELUDE + r"""
local daemon, reported, ttl = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local mine = redis.call('HGET', leases, daemon)
if not mine then
  return {'gone', tostring(now)}
end
local l = fields(mine)
if l[4] < 0 then
  return {'gone', tostring(now)}  -- reclaimed: the owner must close it
end
redis.call('HSET', leases, daemon,
           string.format('%d %d %d %.6f %d %d', l[1], l[2], reported, now + ttl, l[5],
                         l[6]))
touch()
return {'ok', tostring(now)}
"""

#: ``adjust``: add deltas to slots (settles that differ from their estimate, releases,
#: admits made while Redis was away); batch ``seq`` of the caller is applied once. ARGV
#: after the window: daemon, seq, then pairs slot, delta. Returns {'ok'|'dup', now}.
ADJUST = _PRELUDE + r"""
local daemon, seq = ARGV[7], tonumber(ARGV[8])
local mark = 'a:' .. daemon
local last = tonumber(redis.call('HGET', leases, mark) or '-1')
if seq <= last then
  return {'dup', tostring(now)}
end
for i = 9, #ARGV, 2 do
  local s, delta = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if (sliding and s >= oldest) or (not sliding and s == slot) then
    redis.call('HINCRBY', usage, s, delta)
  end
end
redis.call('HSET', leases, mark, seq)
touch()
return {'ok', tostring(now)}
"""

#: ``heartbeat``: KEYS[1] the members sorted set (score: when the membership lapses).
#: ARGV: daemon, ttl. Returns {live daemons, now}.
HEARTBEAT = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 10))
return {redis.call('ZCARD', KEYS[1]), tostring(now)}
"""

#: ``leave``: KEYS[1] the members set; ARGV: daemon. At a clean shutdown.
LEAVE = r"""
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""
