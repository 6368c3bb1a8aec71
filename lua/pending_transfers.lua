-- pending_transfers: transfers (and carts left half committed or released)
-- of this partition debited at least
-- ARGS.older_than_ms ago and not yet marked credited, for the finisher; and
-- for the allowance finisher (allowance.lua), the notes of ended holds a
-- customer's allowance paid for (`notes`, written at least that long ago)
-- and the grants not yet known to have their hold whose caller's lease
-- ended at least ARGS.grants_older_than_ms ago (default: older_than_ms;
-- `grants`).
-- Scans at most ARGS.limit records per call from cursor ARGS.cursor.
if not is_int(ARGS.older_than_ms, 0, 86400000) or not is_int(ARGS.limit, 1, 10000)
  or type(ARGS.cursor) ~= 'string' then
  return refuse('bad_argument', { reason = 'older_than_ms, limit and cursor' })
end
local grants_older_than_ms = ARGS.grants_older_than_ms or ARGS.older_than_ms
if not is_int(grants_older_than_ms, 0, 86400000) then
  return refuse('bad_argument', { reason = 'grants_older_than_ms' })
end
local scan = redis.call('HSCAN', K_XFER, ARGS.cursor, 'COUNT', ARGS.limit)
local pending = {}
local carts = {}
local notes = {}
local grants = {}
local fields = scan[2]
for i = 1, #fields, 2 do
  local id, raw = fields[i], fields[i + 1]
  if id:sub(1, 5) == 'cart|' then
    local rec = cjson.decode(raw)
    if rec.since_ms <= NOW - ARGS.older_than_ms then carts[#carts + 1] = rec end
  elseif id:sub(1, 6) == 'allow|' then
    local rec = cjson.decode(raw)
    if rec.at_ms <= NOW - ARGS.older_than_ms then notes[#notes + 1] = rec end
  elseif id:sub(1, 6) == 'grant|' then
    local rec = cjson.decode(raw)
    if rec.until_ms <= NOW - grants_older_than_ms then grants[#grants + 1] = rec end
  elseif id:sub(1, 3) ~= 'in|' and id:sub(1, 10) ~= 'activation' then
    local rec = cjson.decode(raw)
    if rec.status == 'debited' and rec.debited_at_ms <= NOW - ARGS.older_than_ms then
      pending[#pending + 1] = rec
    end
  end
end
return reply({ status = 'ok', cursor = scan[1], transfers = pending, carts = carts,
  notes = notes, grants = grants })
