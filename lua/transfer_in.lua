-- transfer_in: the second half of a transfer. Credits ARGS.qty units to
-- ARGS.to_cell (creating a bucket cell if new) exactly once per transfer id:
-- a second call, from a retry or a concurrent finisher, changes nothing.
-- ARGS.debited_at_ms is the debit's Redis time: a credit more than
-- CREDIT_WINDOW_MS after it is refused (too_old), because the dedupe record of
-- an earlier credit may be gone by then. ARGS.epoch is the source pool's
-- drain epoch at the debit: a fenced bucket credited by a debit made at or
-- after its fence's epoch opens again.
-- Between CREDIT_WINDOW_MS and RETENTION_MS after the debit, a credit that
-- never came is made impossible instead (void; the source then takes the
-- units back); past RETENTION_MS nothing can be proven: too_old, for an
-- operator. Replies: credited {qty, replayed}, void, too_old, bad_argument.
local bad = check_transfer(ARGS)
if bad then return refuse('bad_argument', { reason = bad }) end
if not is_int(ARGS.qty, 1, LIMITS.count_qty_max) or not is_id(ARGS.merchant) or not is_id(ARGS.sku)
  or not is_id(ARGS.location) then
  return refuse('bad_argument', { reason = 'qty and stock key' })
end
if not is_int(ARGS.debited_at_ms, 0, 99999999999999) then
  return refuse('bad_argument', { reason = 'debited_at_ms' })
end
if ARGS.epoch ~= nil and not is_int(ARGS.epoch, 0, 99999999999999) then
  return refuse('bad_argument', { reason = 'epoch' })
end
local done = redis.call('HGET', K_XFER, 'in|' .. ARGS.transfer_id)
if done then
  local rec = cjson.decode(done)
  if rec.void then return reply({ status = 'void', transfer_id = ARGS.transfer_id }) end
  return reply({ status = 'credited', qty = rec.qty, replayed = true })
end
local age_ms = NOW - ARGS.debited_at_ms
if age_ms > CREDIT_WINDOW_MS then
  -- An hour short of the records' life: room for the partitions' clocks.
  if age_ms < RETENTION_MS - 3600 * 1000 then
    -- Between the window and the credit records' life: a credit made after
    -- the debit would still have its record, so none was made. The transfer
    -- is voided here for ever (this record answers every later attempt),
    -- and the source takes its units back (transfer_done with void).
    redis.call('HSET', K_XFER, 'in|' .. ARGS.transfer_id, cjson.encode({
      void = true, qty = ARGS.qty, from_cell = ARGS.from_cell, voided_at_ms = NOW,
    }))
    gc_later('x|in|' .. ARGS.transfer_id)
    return reply({ status = 'void', transfer_id = ARGS.transfer_id })
  end
  return reply({ status = 'too_old', transfer_id = ARGS.transfer_id })
end
housekeeping()
local c = cell_get(ARGS.to_cell)
if not c then
  c = new_cell({ merchant = ARGS.merchant, sku = ARGS.sku, location = ARGS.location,
    bucket_node = ARGS.to_node }, ARGS.to_kind)
end
local on_hand_before, reserved_before = c.on_hand, c.reserved
c.on_hand = c.on_hand + ARGS.qty
c.version = c.version + 1
if c.fenced and ARGS.epoch ~= nil and ARGS.epoch >= (c.fence_epoch or 0) then
  c.fenced = false
end
cell_put(ARGS.to_cell, c)
redis.call('HSET', K_XFER, 'in|' .. ARGS.transfer_id, cjson.encode({
  qty = ARGS.qty, from_cell = ARGS.from_cell, credited_at_ms = NOW,
}))
gc_later('x|in|' .. ARGS.transfer_id)
ledger('transfer_in', ARGS.to_cell, on_hand_before, reserved_before, c, {
  qty = ARGS.qty, transfer_id = ARGS.transfer_id, from_cell = ARGS.from_cell, reason = ARGS.reason,
})
notify(ARGS.to_cell, c)
return reply({ status = 'credited', qty = ARGS.qty, replayed = false, cell = c })
