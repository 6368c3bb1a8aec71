-- transfer_done: marks a debited transfer of this partition as credited, so
-- the finisher stops looking at it and the source cell stops counting its
-- units as in flight. Idempotent. With ARGS.void (the destination voided
-- it: it can never be credited there), the units come back to the source
-- cell instead, recorded as the transfer's credit into its source.
if not is_id(ARGS.transfer_id) then return refuse('bad_argument', { reason = 'transfer_id' }) end
local raw = redis.call('HGET', K_XFER, ARGS.transfer_id)
if not raw then return reply({ status = 'ok', found = false }) end
local rec = cjson.decode(raw)
if ARGS.void == true and rec.status == 'debited' then
  local c = cell_get(rec.from_cell)
  if not c then error('transfer ' .. ARGS.transfer_id .. ' debited missing cell ' .. rec.from_cell) end
  local on_hand_before, reserved_before = c.on_hand, c.reserved
  c.on_hand = c.on_hand + rec.qty
  c.out_in_flight = math.max(0, (c.out_in_flight or 0) - rec.qty)
  c.version = c.version + 1
  cell_put(rec.from_cell, c)
  rec.status = 'voided'
  rec.voided_at_ms = NOW
  redis.call('HSET', K_XFER, ARGS.transfer_id, cjson.encode(rec))
  gc_later('x|' .. ARGS.transfer_id)
  ledger('transfer_in', rec.from_cell, on_hand_before, reserved_before, c, {
    qty = rec.qty, transfer_id = ARGS.transfer_id, from_cell = rec.from_cell, reason = 'void',
  })
  notify(rec.from_cell, c)
  return reply({ status = 'ok', found = true, voided = true })
end
if rec.status == 'debited' then
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
