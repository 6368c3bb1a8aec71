-- transfer_done: marks a debited transfer of this partition as credited, so
-- the finisher stops looking at it. Idempotent.
if not is_id(ARGS.transfer_id) then return refuse('bad_argument', { reason = 'transfer_id' }) end
local raw = redis.call('HGET', K_XFER, ARGS.transfer_id)
if not raw then return reply({ status = 'ok', found = false }) end
local rec = cjson.decode(raw)
if rec.status ~= 'credited' then
  rec.status = 'credited'
  rec.credited_at_ms = NOW
  redis.call('HSET', K_XFER, ARGS.transfer_id, cjson.encode(rec))
  gc_later('x|' .. ARGS.transfer_id)
end
return reply({ status = 'ok', found = true })
