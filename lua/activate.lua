-- activate: pre-split a flash sale's pool once per activation. In one step it
-- takes floor(sellable * ARGS.fraction) units, splits them evenly over
-- ARGS.targets (the first ones get the remainder), debits one transfer per
-- target and records the activation under (sale, epoch); the allocator then
-- credits each bucket (transfer_in) and marks the transfers done.
--
-- A second call with the same sale and epoch moves nothing and answers the
-- first split with, per share, whether its debit is still waiting for its
-- credit (`pending`, with the debit's time and epoch): the allocator credits
-- only those, so a replay at any later time never credits what was not
-- debited, or twice. ARGS.action 'end' forgets the activation when the sale
-- ends, so switching the same sale on again later is a new activation with
-- new transfer ids. A record is kept ACTIVATION_RETENTION_MS at most.
-- While the pool's buckets are being drained nothing is split (draining).
-- ARGS: sale, epoch, from_cell, fraction, targets [{node, to_cell, to_partition}],
--       merchant, sku, location, action ('split' or 'end').
local ACTIVATION_RETENTION_MS = 7 * 24 * 3600 * 1000
local a = ARGS
if not is_id(a.sale) or not is_id(a.epoch) or not is_cell_id(a.from_cell) then
  return refuse('bad_argument', { reason = 'sale, epoch and from_cell' })
end
local marker = 'activation|' .. a.sale .. '|' .. a.epoch
if a.action == 'end' then
  redis.call('HDEL', K_XFER, marker)
  redis.call('ZREM', K_GC, 'x|' .. marker)
  return reply({ status = 'ok' })
end
if type(a.fraction) ~= 'number' or a.fraction < 0 or a.fraction > 1 then
  return refuse('bad_argument', { reason = 'fraction' })
end
if type(a.targets) ~= 'table' or #a.targets < 1 or #a.targets > 1024 then
  return refuse('bad_argument', { reason = 'targets' })
end
for _, t in ipairs(a.targets) do
  if not is_id(t.node) or not is_cell_id(t.to_cell) or not is_int(t.to_partition, 0, LIMITS.partition_max) then
    return refuse('bad_argument', { reason = 'target' })
  end
end
local done = redis.call('HGET', K_XFER, marker)
if done then
  local rec = cjson.decode(done)
  for _, share in ipairs(rec.split) do
    local raw = redis.call('HGET', K_XFER, share.transfer_id)
    local debit = raw and cjson.decode(raw) or nil
    share.pending = debit ~= nil and debit.status == 'debited' and debit.qty > 0
    -- Credited where the debit sent it, whatever the caller's placement.
    if debit then share.to_partition = debit.to_partition end
    if share.pending then
      share.debited_at_ms = debit.debited_at_ms
      share.epoch = debit.epoch
    end
  end
  return reply({ status = 'activated', replayed = true, split = rec.split })
end
housekeeping()
expire_cell_due(a.from_cell)
local c = cell_get(a.from_cell)
if not c then return refuse('not_found') end
if drain_live(c) then return refuse('draining', { until_ms = c.drain_until_ms }) end
for _, t in ipairs(a.targets) do
  local refusal = bucket_placement_refusal(c, t.node, t.to_partition)
  if refusal then return refusal end
end
-- Transfer ids are unique for ever across every partition: the pool's
-- partition, a per-partition activation counter and the Redis time (the
-- counter starts again in a Redis that lost it; the ledger keeps the ids
-- the earlier one gave).
local generation = redis.call('HINCRBY', K_XFER, 'activation_generation', 1)
local free = sellable(c)
if free < 0 then free = 0 end
local total = math.floor(free * a.fraction)
local n = #a.targets
local split = {}
for i, t in ipairs(a.targets) do
  local share = math.floor(total / n)
  if i - 1 < total % n then share = share + 1 end
  local transfer_id = 'act.' .. ARGS.partition .. '.' .. generation .. '.' .. NOW .. '.' .. i
  local moved, rec = 0, nil
  if share > 0 then
    local transfer = {
      transfer_id = transfer_id, from_cell = a.from_cell, to_cell = t.to_cell,
      to_partition = t.to_partition, to_kind = 'bucket', to_node = t.node, reason = 'activate',
    }
    local refusal
    moved, refusal, rec = transfer_debit(transfer, share, false)
    if refusal then error('activation debit refused after its checks: ' .. refusal) end
  end
  split[i] = { node = t.node, qty = moved, transfer_id = transfer_id, pending = moved > 0,
    to_partition = t.to_partition,
    debited_at_ms = rec and rec.debited_at_ms or nil, epoch = rec and rec.epoch or nil }
end
redis.call('HSET', K_XFER, marker, cjson.encode({ split = split, at_ms = NOW, generation = generation }))
redis.call('ZADD', K_GC, NOW + ACTIVATION_RETENTION_MS, 'x|' .. marker)
return reply({ status = 'activated', replayed = false, split = split })
