-- rebuild: sets one cell to what the ledger says, for `ledger-writer rebuild`
-- after Redis lost or corrupted it. The caller replays the ledger (PostgreSQL
-- plus the unrelayed outbox) and passes the cell's last quantities, version
-- and settings, the ids of the holds the ledger still has open, and what it
-- saw in Redis when it checked the cell was quiet (compare-and-set: a write
-- since then refuses the rebuild, so no decision is lost).
-- ARGS: cell, merchant, sku, location, kind ('pool' or 'bucket'), bucket_node,
--   expect_version (-1: the cell must be absent), on_hand, reserved, version,
--   out_in_flight, safety_stock, backorder_limit, low_stock_threshold,
--   open_holds (ids).
-- Open holds whose records Redis no longer has can never be committed or
-- released: their units are released by the rebuild, in its ledger entry
-- (op 'rebuild', qty = units released, `released` = their ids). Holds Redis
-- still has stay held. on_hand is the ledger's: no unit is created or lost.
local a = ARGS
if not is_cell_id(a.cell) or not is_id(a.merchant) or not is_id(a.sku) or not is_id(a.location)
  or (a.kind ~= 'pool' and a.kind ~= 'bucket') or (a.kind == 'bucket' and not is_id(a.bucket_node)) then
  return refuse('bad_argument', { reason = 'cell' })
end
local BIG = 1000000000000
if not is_int(a.expect_version, -1, BIG) or not is_int(a.on_hand, -BIG, BIG)
  or not is_int(a.reserved, 0, BIG) or not is_int(a.version, 0, BIG)
  or not is_int(a.out_in_flight, 0, BIG) or not is_int(a.safety_stock, 0, BIG)
  or not is_int(a.backorder_limit, 0, BIG) or not is_int(a.low_stock_threshold, -1, BIG)
  or type(a.open_holds) ~= 'table' then
  return refuse('bad_argument', { reason = 'quantities' })
end
for _, id in ipairs(a.open_holds) do
  if not is_id(id) then return refuse('bad_argument', { reason = 'open_holds' }) end
end

local found = cell_get(a.cell)
if (a.expect_version == -1 and found) or (a.expect_version >= 0 and (not found or found.version ~= a.expect_version)) then
  return refuse('conflict', { reason = 'the cell changed since it was checked' })
end
local held, released, released_units = 0, {}, 0
for _, id in ipairs(a.open_holds) do
  local r = res_get(id)
  if r and r.status == 'held' and r.cell == a.cell then
    held = held + r.qty
  else
    released[#released + 1] = id
  end
end
if held > a.reserved then
  return refuse('conflict', { reason = 'redis holds more units than the ledger has reserved' })
end
released_units = a.reserved - held

local c = found or new_cell({ merchant = a.merchant, sku = a.sku, location = a.location,
  bucket_node = a.bucket_node }, a.kind)
c.kind = a.kind
c.node = a.bucket_node
c.on_hand = a.on_hand
c.reserved = held
c.out_in_flight = a.out_in_flight
c.safety_stock = a.safety_stock
c.backorder_limit = a.backorder_limit
c.low_stock_threshold = a.low_stock_threshold
-- Never backwards: caches and ETags take a higher version as newer (transfer
-- bookkeeping bumps versions without a ledger entry).
local base = a.version
if found and found.version > base then base = found.version end
c.version = base + 1
cell_put(a.cell, c)
local extra = { qty = released_units }
if #released > 0 then extra.released = released end
if found then
  extra.found_on_hand = found.on_hand
  extra.found_reserved = found.reserved
  extra.found_version = found.version
end
ledger('rebuild', a.cell, a.on_hand, a.reserved, c, extra)
notify(a.cell, c)
return reply({ status = 'ok', cell = c, released_units = released_units, released_holds = #released })
