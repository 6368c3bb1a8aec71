-- relay_lease: one ledger writer's lease on one partition's outbox, with a
-- fencing token. Not prepended with lib.lua: it touches no stock.
--   KEYS[1] lease          STRING "owner token", expires after the lease time
--   KEYS[2] token counter  STRING, only ever incremented
--   ARGV[1] 'hold', 'release' or 'advance'; ARGV[2] owner (no spaces);
--   ARGV[3] lease time (ms); ARGV[4] (advance) the floor, a token
-- hold: takes the lease when it is free, with a new token larger than every
-- earlier one of the partition, or renews it when this owner holds it.
-- release: drops it when this owner holds it.
-- advance: when this owner holds it, gives it a new token larger than the
-- floor (PostgreSQL's fence: the newest token it has seen for the
-- partition), the counter first raised to the floor. For a counter that went
-- back because Redis lost it or was replaced: the fence stays strict and
-- the holder writes again. The lease keeps its time.
-- Replies JSON: {"v":1,"status":"held"|"acquired"|"advanced"|"taken"|"released"|"not_held"|"bad_argument"}.
local action, owner, ttl_ms, floor = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if (action ~= 'hold' and action ~= 'release' and action ~= 'advance') or type(owner) ~= 'string'
  or owner == '' or string.find(owner, '%s') or not ttl_ms or ttl_ms < 1
  or ttl_ms ~= math.floor(ttl_ms) then
  return cjson.encode({ v = 1, status = 'bad_argument' })
end
if action == 'advance' and (not floor or floor < 0 or floor ~= math.floor(floor) or floor > 2^52) then
  return cjson.encode({ v = 1, status = 'bad_argument' })
end
local current = redis.call('GET', KEYS[1])
local holder, token = nil, nil
if current then holder, token = string.match(current, '^(%S+) (%d+)$') end
if action == 'release' then
  if holder == owner then
    redis.call('DEL', KEYS[1])
    return cjson.encode({ v = 1, status = 'released', token = tonumber(token) })
  end
  return cjson.encode({ v = 1, status = 'not_held' })
end
if action == 'advance' then
  if holder ~= owner then return cjson.encode({ v = 1, status = 'not_held' }) end
  local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
  if counter < floor then redis.call('SET', KEYS[2], string.format('%d', floor)) end
  token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], owner .. ' ' .. token, 'KEEPTTL')
  return cjson.encode({ v = 1, status = 'advanced', token = token })
end
if not current then
  token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], owner .. ' ' .. token, 'PX', ttl_ms)
  return cjson.encode({ v = 1, status = 'acquired', token = token })
end
if holder == owner then
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  return cjson.encode({ v = 1, status = 'held', token = tonumber(token) })
end
return cjson.encode({ v = 1, status = 'taken', holder = holder or current })
