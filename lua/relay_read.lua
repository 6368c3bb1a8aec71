-- relay_read: the next batch of a partition's outbox for the lease holder.
-- Not prepended with lib.lua: it touches no stock.
--   KEYS[1] lease   STRING "owner token"
--   KEYS[2] ledger  STREAM the partition's outbox
--   ARGV[1] the lease as the caller holds it ("owner token"); ARGV[2] group;
--   ARGV[3] consumer; ARGV[4] most entries
-- Fenced: refused unless the caller still holds the lease, so a writer that
-- lost its lease (paused, partitioned) cannot take entries another relays.
-- Entries pending in the group are re-read first, whichever consumer read
-- them (a writer died before acknowledging them; every writer uses the
-- same consumer name, older versions used their own), then new ones.
-- Replies JSON: {"v":1,"status":"ok","entries":[[id, e or null], ...]} (an
-- entry deleted while pending has no fields) or {"v":1,"status":"fenced"}.
local lease, group, consumer, count = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if not count or count < 1 or count > 10000 then
  return cjson.encode({ v = 1, status = 'bad_argument' })
end
if redis.call('GET', KEYS[1]) ~= lease then
  return cjson.encode({ v = 1, status = 'fenced' })
end

local function read(from)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
    'STREAMS', KEYS[2], from)
  local entries = {}
  if not reply or not reply[1] then return entries end
  for _, item in ipairs(reply[1][2]) do
    local fields, e = item[2], cjson.null
    if fields then
      -- An entry without an `e` field is malformed, not gone: '' fails to parse.
      e = ''
      for i = 1, #fields, 2 do
        if fields[i] == 'e' then e = fields[i + 1] end
      end
    end
    entries[#entries + 1] = { item[1], e }
  end
  return entries
end

local entries = read('0')
if #entries == 0 then
  local summary = redis.call('XPENDING', KEYS[2], group)
  if summary[1] > 0 then
    -- Pending under another consumer name: take them over, oldest first.
    redis.call('XAUTOCLAIM', KEYS[2], group, consumer, 0, '0-0', 'COUNT', count, 'JUSTID')
    entries = read('0')
  end
end
if #entries == 0 then entries = read('>') end
if #entries == 0 then return '{"v":1,"status":"ok","entries":[]}' end
return cjson.encode({ v = 1, status = 'ok', entries = entries })
