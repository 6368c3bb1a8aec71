-- relay_writers: the registry of running ledger writers. Not prepended with
-- lib.lua: it touches no stock.
--   KEYS[1] writers ZSET writer id, score = Redis time (ms) its membership lapses
--   ARGV[1] 'join' (join or renew) or 'leave'; ARGV[2] writer id; ARGV[3] lease time (ms)
-- Drops lapsed members, and replies JSON {"v":1,"status":"ok","writers":[ids, sorted]}.
local action, writer, ttl_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
if (action ~= 'join' and action ~= 'leave') or type(writer) ~= 'string' or writer == ''
  or string.find(writer, '%s') or not ttl_ms or ttl_ms < 1 then
  return cjson.encode({ v = 1, status = 'bad_argument' })
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if action == 'join' then
  redis.call('ZADD', KEYS[1], now_ms + ttl_ms, writer)
else
  redis.call('ZREM', KEYS[1], writer)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local writers = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(writers)
if #writers == 0 then return '{"v":1,"status":"ok","writers":[]}' end
return cjson.encode({ v = 1, status = 'ok', writers = writers })
