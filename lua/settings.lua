-- settings: safety stock, backorder limit and low-stock threshold of a pool
-- cell (created if new). No units move; the entry is in the ledger because
-- sellable changes. The reorder point and quantity (ARGS.reorder_point, -1
-- for none, and ARGS.reorder_qty) are only written in the entry: they
-- decide no stock, and the writer's signals read them there. While the pool has lent units to buckets, settings that
-- would leave the pool short are answered needs_drain (nothing written)
-- unless they come inside the key's live drain (ARGS.drain_epoch): the
-- buckets are fenced first, so the key stops selling what it no longer may.
local a = ARGS
if not is_id(a.merchant) or not is_id(a.sku) or not is_id(a.location) or not is_cell_id(a.cell) then
  return refuse('bad_argument', { reason = 'stock key' })
end
if not is_int(a.safety_stock, 0, LIMITS.count_qty_max) or not is_int(a.backorder_limit, 0, LIMITS.count_qty_max)
  or not is_int(a.low_stock_threshold, -1, LIMITS.count_qty_max)
  or not is_int(a.reorder_point or -1, -1, LIMITS.count_qty_max)
  or not is_int(a.reorder_qty or 0, 0, LIMITS.count_qty_max) then
  return refuse('bad_argument', { reason = 'settings' })
end
if a.drain_epoch ~= nil and not is_int(a.drain_epoch, 1, 99999999999999) then
  return refuse('bad_argument', { reason = 'drain_epoch' })
end
housekeeping()
local c = cell_get(a.cell) or new_cell(a, 'pool')
if has_buckets(c) then
  if a.drain_epoch ~= nil then
    if c.drain_epoch ~= a.drain_epoch or not drain_live(c) then
      return refuse('drain_lost', { reason = 'the drain lease lapsed or another drain took it' })
    end
    c.drain_until_ms = 0
  elseif c.on_hand - c.reserved - a.safety_stock < -a.backorder_limit then
    return reply({ status = 'needs_drain' })
  end
end
c.safety_stock = a.safety_stock
c.backorder_limit = a.backorder_limit
c.low_stock_threshold = a.low_stock_threshold
c.version = c.version + 1
cell_put(a.cell, c)
-- A reorder point is written only when set: the entry of a key without one
-- is the one a writer of the release before reorder points reads.
local reorder_point, reorder_qty
if (a.reorder_point or -1) >= 0 then
  reorder_point, reorder_qty = a.reorder_point, a.reorder_qty or 0
end
ledger('settings', a.cell, c.on_hand, c.reserved, c, {
  qty = 0, safety_stock = a.safety_stock, backorder_limit = a.backorder_limit,
  low_stock_threshold = a.low_stock_threshold,
  reorder_point = reorder_point, reorder_qty = reorder_qty,
})
notify(a.cell, c)
return reply({ status = 'ok', cell = c })
