-- relay_ack: the lease holder acknowledges a relayed batch and trims the
-- outbox below its oldest unacknowledged entry. Not prepended with lib.lua.
--   KEYS[1] lease   STRING "owner token"
--   KEYS[2] ledger  STREAM the partition's outbox
--   ARGV[1] the lease as the caller holds it; ARGV[2] group; ARGV[3..] stream ids
-- Fenced like relay_read: a writer that lost its lease acknowledges nothing
-- (the new holder relays the batch again; PostgreSQL keeps one row per entry).
-- Replies JSON: {"v":1,"status":"ok","acked":n,"trimmed":n} or {"v":1,"status":"fenced"}.
if #ARGV < 3 then return cjson.encode({ v = 1, status = 'bad_argument' }) end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return cjson.encode({ v = 1, status = 'fenced' })
end
local group = ARGV[2]
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local acked = redis.call('XACK', KEYS[2], group, unpack(ids))
-- Relayed entries go, unrelayed ones never do: keep everything from the
-- oldest pending entry on, or from the last acknowledged one.
local summary = redis.call('XPENDING', KEYS[2], group)
local keep_from = ids[#ids]
if summary[1] > 0 then keep_from = summary[2] end
local trimmed = redis.call('XTRIM', KEYS[2], 'MINID', '=', keep_from)
return cjson.encode({ v = 1, status = 'ok', acked = acked, trimmed = trimmed })
