-- transfer_done: marks a debited transfer of this partition as credited, so
-- the finisher stops looking at it and the source cell stops counting its
-- units as in flight. Idempotent.
if not is_id(ARGS.transfer_id) then return refuse('bad_argument', { reason = 'transfer_id' }) end
local raw = redis.call('HGET', K_XFER, ARGS.transfer_id)
if not raw then return reply({ status = 'ok', found = false }) end
local rec = cjson.decode(raw)
if rec.status ~= 'credited' then
  rec.status = 'credited'
  rec.credited_at_ms = NOW
  redis.call('HSET', K_XFER, ARGS.transfer_id, cjson.encode(rec))
  gc_later('x|' .. ARGS.transfer_id)
  local c = cell_get(rec.from_cell)
  if c then
    c.out_in_flight = math.max(0, (c.out_in_flight or 0) - rec.qty)
    c.version = c.version + 1
    cell_put(rec.from_cell, c)
  end
end
return reply({ status = 'ok', found = true })
