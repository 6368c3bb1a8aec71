-- activate: pre-split a flash sale's pool once per epoch. In one step it takes
-- floor(sellable * ARGS.fraction) units, splits them evenly over ARGS.targets
-- (the first ones get the remainder), debits one transfer per target and
-- records the activation; the allocator then credits each bucket
-- (transfer_in) and marks the transfers done. A second call with the same
-- sale and epoch moves nothing and answers the first split.
-- ARGS: sale, epoch, from_cell, fraction, targets [{node, to_cell, to_partition}],
--       merchant, sku, location.
local a = ARGS
if not is_id(a.sale) or not is_id(a.epoch) or not is_cell_id(a.from_cell) then
  return refuse('bad_argument', { reason = 'sale, epoch and from_cell' })
end
if type(a.fraction) ~= 'number' or a.fraction < 0 or a.fraction > 1 then
  return refuse('bad_argument', { reason = 'fraction' })
end
if type(a.targets) ~= 'table' or #a.targets < 1 or #a.targets > 1024 then
  return refuse('bad_argument', { reason = 'targets' })
end
for _, t in ipairs(a.targets) do
  if not is_id(t.node) or not is_cell_id(t.to_cell) or not is_int(t.to_partition, 0, 16383) then
    return refuse('bad_argument', { reason = 'target' })
  end
end
local marker = 'activation|' .. a.sale .. '|' .. a.epoch
local done = redis.call('HGET', K_XFER, marker)
if done then
  local rec = cjson.decode(done)
  return reply({ status = 'activated', replayed = true, split = rec.split })
end
housekeeping()
expire_cell_due(a.from_cell)
local c = cell_get(a.from_cell)
if not c then return refuse('not_found') end
local free = sellable(c)
if free < 0 then free = 0 end
local total = math.floor(free * a.fraction)
local n = #a.targets
local split = {}
for i, t in ipairs(a.targets) do
  local share = math.floor(total / n)
  if i - 1 < total % n then share = share + 1 end
  local moved = 0
  if share > 0 then
    local transfer = {
      transfer_id = 'activate.' .. a.sale .. '.' .. a.epoch .. '.' .. t.node,
      from_cell = a.from_cell, to_cell = t.to_cell, to_partition = t.to_partition,
      to_kind = 'bucket', to_node = t.node, reason = 'activate',
    }
    moved = transfer_debit(transfer, share, false)
  end
  split[i] = { node = t.node, qty = moved, transfer_id = 'activate.' .. a.sale .. '.' .. a.epoch .. '.' .. t.node }
end
redis.call('HSET', K_XFER, marker, cjson.encode({ split = split, at_ms = NOW }))
return reply({ status = 'activated', replayed = false, split = split })
