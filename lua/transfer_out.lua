-- transfer_out: the first half of moving units between cells of different
-- partitions. Debits up to ARGS.qty sellable units of ARGS.from_cell (all of
-- them or none when ARGS.exact) and records transfer ARGS.transfer_id as
-- debited; transfer_in credits the destination. Idempotent on the transfer id.
-- Replies: debited {qty, debited_at_ms, epoch} (qty 0: nothing moved, with
-- `why`: empty, draining (the pool's buckets are being drained) or fenced (a
-- fenced bucket gives units back only to a drain)), insufficient_stock,
-- not_found, bad_argument.
local bad = check_transfer(ARGS)
if bad then return refuse('bad_argument', { reason = bad }) end
if not is_int(ARGS.qty, 1, LIMITS.count_qty_max) then return refuse('bad_argument', { reason = 'qty' }) end
housekeeping()
local moved, refusal, rec, why = transfer_debit(ARGS, ARGS.qty, ARGS.exact == true)
if refusal then return refusal end
local out = { status = 'debited', qty = moved, transfer_id = ARGS.transfer_id, why = why }
if rec then
  out.debited_at_ms = rec.debited_at_ms
  out.epoch = rec.epoch
end
return reply(out)
