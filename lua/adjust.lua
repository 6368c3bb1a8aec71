-- adjust: a physical stock change from WMS, POS, ERP or ops, about the key
-- (one shelf, however many cells hold it), applied at its pool cell.
-- kind 'delta' adds qty (may be negative); kind 'absolute' sets the key's
-- physical count to qty and is applied only for a source_seq newer than the
-- last applied one of that key and source. (source, event_id) is applied at
-- most once. A loss may take sellable below -backorder_limit: that is
-- recorded as a shortfall, and reserve refuses until stock is restored.
-- Creates the cell if it is new.
--
-- While the pool has lent units to buckets, the buckets' units are part of
-- the key's count: an absolute count, or a delta that would leave the pool
-- short, is answered needs_drain (nothing written) unless it comes inside a
-- drain (ARGS.drain_epoch, the live drain lease): the allocator has fenced
-- every bucket (they sell nothing), taken their free units back, seen no
-- units in flight, and passes ARGS.buckets_on_hand, what the fenced buckets
-- still hold (only held units, which can only leave by commits now). The
-- count then sets the pool to qty - buckets_on_hand, so the key's cells hold
-- the count and never more; the drain ends with the adjustment.
-- Replies: adjusted {applied=true, shortfall, cell}, adjusted {applied=false,
-- reason=duplicate|stale}, needs_drain, drain_lost, bad_argument.
local a = ARGS
if not is_id(a.merchant) or not is_id(a.sku) or not is_id(a.location) or not is_cell_id(a.cell) then
  return refuse('bad_argument', { reason = 'stock key' })
end
if not is_id(a.source) or not is_id(a.event_id) then
  return refuse('bad_argument', { reason = 'source and event_id' })
end
if a.kind == 'delta' then
  if not is_int(a.qty, -LIMITS.delta_qty_max, LIMITS.delta_qty_max) or a.qty == 0 then
    return refuse('bad_argument', { reason = 'qty' })
  end
elseif a.kind == 'absolute' then
  if not is_int(a.qty, 0, LIMITS.count_qty_max) then return refuse('bad_argument', { reason = 'qty' }) end
  if not is_int(a.source_seq, 0, LIMITS.source_seq_max) then
    return refuse('bad_argument', { reason = 'source_seq is required for absolute counts' })
  end
else
  return refuse('bad_argument', { reason = 'kind' })
end
if a.source_seq ~= nil and not is_int(a.source_seq, 0, LIMITS.source_seq_max) then
  return refuse('bad_argument', { reason = 'source_seq' })
end
if a.drain_epoch ~= nil and not is_int(a.drain_epoch, 1, 99999999999999) then
  return refuse('bad_argument', { reason = 'drain_epoch' })
end
if a.buckets_on_hand ~= nil and not is_int(a.buckets_on_hand, -1000000000000, 1000000000000) then
  return refuse('bad_argument', { reason = 'buckets_on_hand' })
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
    return reply({ status = 'adjusted', applied = false, reason = 'stale', last_source_seq = int_text(last) })
  end
end

housekeeping()
expire_cell_due(a.cell)
local c = cell_get(a.cell) or new_cell(a, 'pool')
local buckets_on_hand = 0
if has_buckets(c) then
  if a.drain_epoch ~= nil then
    if c.drain_epoch ~= a.drain_epoch or not drain_live(c) then
      return refuse('drain_lost', { reason = 'the drain lease lapsed or another drain took it' })
    end
    if (c.out_in_flight or 0) ~= 0 then
      return refuse('drain_lost', { reason = 'units are in flight from the pool' })
    end
    if a.kind == 'absolute' then
      if a.buckets_on_hand == nil then return refuse('bad_argument', { reason = 'buckets_on_hand' }) end
      buckets_on_hand = a.buckets_on_hand
    end
  else
    local after = c.on_hand + a.qty
    if a.kind == 'absolute' then after = a.qty end
    if a.kind == 'absolute' or after - c.reserved - c.safety_stock < -c.backorder_limit then
      return reply({ status = 'needs_drain' })
    end
  end
end
local on_hand_before, reserved_before = c.on_hand, c.reserved
if a.kind == 'delta' then
  c.on_hand = c.on_hand + a.qty
else
  c.on_hand = a.qty - buckets_on_hand
end
c.version = c.version + 1
if a.drain_epoch ~= nil then c.drain_until_ms = 0 end
local shortfall = sellable(c) < -c.backorder_limit
cell_put(a.cell, c)
redis.call('HSET', K_IDEM, event_key, '1')
gc_later('i|' .. event_key)
if a.source_seq ~= nil then redis.call('HSET', K_SEQ, seq_key, int_text(a.source_seq)) end
local extra = {
  qty = c.on_hand - on_hand_before, kind = a.kind, source = a.source,
  source_event_id = a.event_id, shortfall = shortfall,
}
if a.source_seq ~= nil then extra.source_seq = int_text(a.source_seq) end
if a.kind == 'absolute' then
  extra.counted = a.qty
  if has_buckets(c) then extra.buckets_on_hand = buckets_on_hand end
end
if a.drain_epoch ~= nil then extra.drain_epoch = a.drain_epoch end
ledger('adjust', a.cell, on_hand_before, reserved_before, c, extra)
notify(a.cell, c)
return reply({ status = 'adjusted', applied = true, shortfall = shortfall, cell = c })
