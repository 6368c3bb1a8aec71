-- fence: a bucket's side of a drain. Fences bucket ARGS.from_cell for drain
-- epoch ARGS.epoch (it sells nothing until a refill debited at or after that
-- epoch reaches it) and debits all its free units towards the pool as
-- transfer ARGS.transfer_id; the allocator credits the pool. A fence from an
-- older epoch than the bucket's is refused (fenced_out): that drain lost its
-- lease to a newer one. Held units stay until their holds end; units a
-- release frees later stay fenced here until the next drain or refill.
-- A bucket the pool lists but whose first credit has not landed is created
-- here, empty and fenced. Replies: fenced {qty, debited_at_ms, cell},
-- fenced_out, bad_argument.
local bad = check_transfer(ARGS)
if bad then return refuse('bad_argument', { reason = bad }) end
if ARGS.to_kind ~= 'pool' then return refuse('bad_argument', { reason = 'a drain returns units to the pool' }) end
if not is_int(ARGS.epoch, 1, 99999999999999) then return refuse('bad_argument', { reason = 'epoch' }) end
housekeeping()
if not is_id(ARGS.bucket_node) then return refuse('bad_argument', { reason = 'bucket_node' }) end
local c = cell_get(ARGS.from_cell)
if not c then
  -- Not credited yet (the pool listed it when it lent): a fenced empty
  -- bucket now, so the late credit, debited before this fence, keeps it shut.
  c = new_cell({ merchant = ARGS.merchant, sku = ARGS.sku, location = ARGS.location,
    bucket_node = ARGS.bucket_node }, 'bucket')
end
if c.kind ~= 'bucket' then return refuse('bad_argument', { reason = 'only buckets are fenced' }) end
if ARGS.epoch < (c.fence_epoch or 0) then
  return refuse('fenced_out', { fence_epoch = c.fence_epoch })
end
if not c.fenced or c.fence_epoch ~= ARGS.epoch then
  c.fenced = true
  c.fence_epoch = ARGS.epoch
  c.version = c.version + 1
  cell_put(ARGS.from_cell, c)
  notify(ARGS.from_cell, c)
end
local t = {}
for k, v in pairs(ARGS) do t[k] = v end
t.fence = true
local moved, refusal, rec = transfer_debit(t, LIMITS.count_qty_max, false)
if refusal then return refusal end
return reply({ status = 'fenced', qty = moved, transfer_id = ARGS.transfer_id,
  debited_at_ms = rec and rec.debited_at_ms or nil, cell = cell_get(ARGS.from_cell) })
