-- relay_lease: one ledger writer's lease on one partition's outbox, with a
-- fencing token. Not prepended with lib.lua: it touches no stock.
--   KEYS[1] lease          STRING "owner token", expires after the lease time
--   KEYS[2] token counter  STRING, only ever incremented
--   ARGV[1] 'hold' or 'release'; ARGV[2] owner (no spaces); ARGV[3] lease time (ms)
-- hold: takes the lease when it is free, with a new token larger than every
-- earlier one of the partition, or renews it when this owner holds it.
-- release: drops it when this owner holds it.
-- Replies JSON: {"v":1,"status":"held"|"acquired"|"taken"|"released"|"not_held"|"bad_argument"}.
local action, owner, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
if (action ~= 'hold' and action ~= 'release') or type(owner) ~= 'string' or owner == ''
  or string.find(owner, '%s') or not ttl_ms or ttl_ms < 1 or ttl_ms ~= math.floor(ttl_ms) then
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
