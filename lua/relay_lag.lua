-- relay_lag: how far the writers are behind on one partition's outbox.
-- Read only; not prepended with lib.lua.
--   KEYS[1] ledger STREAM; ARGV[1] group
-- Replies JSON: {"v":1,"status":"ok","entries":n,"oldest_ms":ms or 0,"now_ms":ms}
-- where entries are those not yet acknowledged (pending or never read) and
-- oldest_ms is the Redis time of the oldest of them (0 when there is none).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function id_ms(id) return tonumber(string.match(id, '^(%d+)')) end
local function first_after(from)
  local range = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 1)
  if range[1] then return id_ms(range[1][1]) end
  return 0
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return cjson.encode({ v = 1, status = 'ok', entries = 0, oldest_ms = 0, now_ms = now_ms })
end
local length = redis.call('XLEN', KEYS[1])
local group = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
  if fields['name'] == ARGV[1] then group = fields end
end
if not group then
  return cjson.encode({ v = 1, status = 'ok', entries = length, oldest_ms = first_after('-'), now_ms = now_ms })
end
local pending = group['pending']
-- Not XINFO's own `lag`: it is computed from counters that trimming and
-- claiming leave stale (it reported 178,427 for a stream of one entry). The
-- relay trims below its oldest pending entry, so few entries are at or
-- before the last delivered one; the rest are unread. Counted up to a bound
-- (past it, unread is over-reported, never under).
local delivered = redis.call('XRANGE', KEYS[1], '-', group['last-delivered-id'], 'COUNT', 10000)
local unread = length - #delivered
if unread < 0 then unread = 0 end
local oldest_ms = 0
if pending > 0 then
  oldest_ms = id_ms(redis.call('XPENDING', KEYS[1], ARGV[1])[2])
elseif unread > 0 then
  oldest_ms = first_after('(' .. group['last-delivered-id'])
end
return cjson.encode({ v = 1, status = 'ok', entries = pending + unread, oldest_ms = oldest_ms, now_ms = now_ms })
