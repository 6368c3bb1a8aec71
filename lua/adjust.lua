-- adjust: a physical stock change from WMS, POS, ERP or ops on a pool cell.
-- kind 'delta' adds qty (may be negative); kind 'absolute' sets on_hand to qty
-- and is applied only for a source_seq newer than the last applied one of that
-- key and source. (source, event_id) is applied at most once. A loss may take
-- sellable below -backorder_limit: that is recorded as a shortfall, and
-- reserve refuses until stock is restored. Creates the cell if it is new.
-- Replies: adjusted {applied=true, shortfall, cell}, adjusted {applied=false,
-- reason=duplicate|stale}, bad_argument.
local a = ARGS
if not is_id(a.merchant) or not is_id(a.sku) or not is_id(a.location) or not is_cell_id(a.cell) then
  return refuse('bad_argument', { reason = 'stock key' })
end
if not is_id(a.source) or not is_id(a.event_id) then
  return refuse('bad_argument', { reason = 'source and event_id' })
end
if a.kind == 'delta' then
  if not is_int(a.qty, -1000000, 1000000) or a.qty == 0 then
    return refuse('bad_argument', { reason = 'qty' })
  end
elseif a.kind == 'absolute' then
  if not is_int(a.qty, 0, 1000000000) then return refuse('bad_argument', { reason = 'qty' }) end
  if not is_int(a.source_seq, 0, 9007199254740991) then
    return refuse('bad_argument', { reason = 'source_seq is required for absolute counts' })
  end
else
  return refuse('bad_argument', { reason = 'kind' })
end
if a.source_seq ~= nil and not is_int(a.source_seq, 0, 9007199254740991) then
  return refuse('bad_argument', { reason = 'source_seq' })
end

local stock_key = a.merchant .. '|' .. a.sku .. '|' .. a.location
local event_key = 'e|' .. stock_key .. '|' .. a.source .. '|' .. a.event_id
if redis.call('HEXISTS', K_IDEM, event_key) == 1 then
  return reply({ status = 'adjusted', applied = false, reason = 'duplicate' })
end
local seq_key = stock_key .. '|' .. a.source
if a.source_seq ~= nil then
  local last = tonumber(redis.call('HGET', K_SEQ, seq_key))
  if last and a.source_seq <= last then
    return reply({ status = 'adjusted', applied = false, reason = 'stale', last_source_seq = last })
  end
end

housekeeping()
expire_cell_due(a.cell)
local c = cell_get(a.cell) or new_cell(a, 'pool')
local on_hand_before, reserved_before = c.on_hand, c.reserved
if a.kind == 'delta' then
  c.on_hand = c.on_hand + a.qty
else
  c.on_hand = a.qty
end
c.version = c.version + 1
local shortfall = sellable(c) < -c.backorder_limit
cell_put(a.cell, c)
redis.call('HSET', K_IDEM, event_key, '1')
if a.source_seq ~= nil then redis.call('HSET', K_SEQ, seq_key, a.source_seq) end
ledger('adjust', a.cell, on_hand_before, reserved_before, c, {
  qty = c.on_hand - on_hand_before, kind = a.kind, source = a.source,
  source_event_id = a.event_id, source_seq = a.source_seq, shortfall = shortfall,
})
notify(a.cell, c)
return reply({ status = 'adjusted', applied = true, shortfall = shortfall, cell = c })
