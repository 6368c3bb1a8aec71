-- cart: the record of a reservation of several holds (a cart of lines, a
-- line split across locations, a line whose location the allocator chose),
-- in the partition of its id. Its `lines` are its holds (one or more).
-- It alone decides the cart's status; the allocator applies the lines one by
-- one (each idempotent) around these steps. ARGS.action:
--   create   store the held cart (ARGS.lines; ARGS.partial, ARGS.unfilled
--            for a partial reservation); idempotent on its id
--   begin    held -> committing | releasing (ARGS.to); refuses if expired or
--            finished otherwise; records the cart for the finisher
--   finish   committing -> committed, releasing -> released; idempotent
local a = ARGS
if not is_id(a.reservation_id) then return refuse('bad_argument', { reason = 'reservation_id' }) end

if a.action == 'create' then
  -- The request's claim (claim.lua, same partition) fixed the cart id and
  -- decides who may create it: only the caller holding the claim's current
  -- token and attempt (a caller whose claim was taken over, or whose attempt
  -- was abandoned, creates nothing: lost). A record that exists already is
  -- this request's cart, made by an earlier holder of the claim.
  local existing = res_get(a.reservation_id)
  if existing then
    local view = reservation_view(existing)
    view.replayed = true
    return reply(view)
  end
  if type(a.digest) ~= 'string' or not is_int(a.token, 1, 99999999999999)
    or not is_int(a.attempt, 0, 99999999999999) then
    return refuse('bad_argument', { reason = 'digest, token and attempt' })
  end
  local raw_claim = redis.call('HGET', K_IDEM, 'c|' .. a.digest)
  local claim = raw_claim and cjson.decode(raw_claim) or nil
  if not claim or claim.state ~= 'pending' or claim.token ~= a.token or claim.attempt ~= a.attempt then
    return reply({ status = 'lost' })
  end
  if type(a.lines) ~= 'table' or #a.lines < 1 or #a.lines > LIMITS.cart_lines_max or not is_id(a.merchant)
    or not is_int(a.ttl_ms, 1, LIMITS.ttl_ms_max) then
    return refuse('bad_argument', { reason = 'lines, merchant and ttl_ms' })
  end
  for _, line in ipairs(a.lines) do
    if not is_id(line.reservation_id) or not is_int(line.partition, 0, LIMITS.partition_max) or not is_int(line.qty, 1, LIMITS.qty_max) then
      return refuse('bad_argument', { reason = 'line' })
    end
  end
  housekeeping()
  local r = {
    reservation_id = a.reservation_id, merchant = a.merchant, status = 'held',
    created_at_ms = NOW, expires_at_ms = NOW + a.ttl_ms, hold_until_ms = NOW + a.ttl_ms,
    lines = a.lines, node = ARGS.node, customer_hash = a.customer_hash,
  }
  -- A partial reservation (allow_partial) keeps what its request lines
  -- asked for and got, as the allocator states it.
  if a.partial == true then
    r.partial = true
    if type(a.unfilled) == 'table' and #a.unfilled > 0 then
      if #a.unfilled > LIMITS.cart_lines_max then return refuse('bad_argument', { reason = 'unfilled' }) end
      r.unfilled = a.unfilled
    end
  end
  res_put(r)
  redis.call('ZADD', K_DUE, r.expires_at_ms, r.reservation_id)
  return reply(reservation_view(r))
end

local r = res_for_caller(a.reservation_id)
if not r or not r.lines then return refuse('not_found') end

if a.action == 'begin' then
  local moving = ({ commit = 'committing', release = 'releasing' })[a.to]
  if not moving then return refuse('bad_argument', { reason = 'to' }) end
  expire_if_due(r)
  if r.status == moving then return reply(reservation_view(r)) end
  local done = ({ commit = 'committed', release = 'released' })[a.to]
  if r.status == done then return reply(reservation_view(r)) end
  if r.status ~= 'held' then
    -- A cart on its way to the other end reports where it is going: a
    -- commit racing a release is refused as released, and the other way.
    local shown = ({ committing = 'committed', releasing = 'released' })[r.status] or r.status
    return refuse('not_held', { reservation_status = shown })
  end
  r.status = moving
  res_put(r)
  redis.call('ZREM', K_DUE, r.reservation_id)
  redis.call('HSET', K_XFER, 'cart|' .. r.reservation_id, cjson.encode({
    reservation_id = r.reservation_id, to = a.to, since_ms = NOW, merchant = r.merchant,
  }))
  return reply(reservation_view(r))
end

if a.action == 'finish' then
  local final = ({ committing = 'committed', releasing = 'released' })[r.status]
  if final then
    r.status = final
    r.finished_at_ms = NOW
    res_put(r)
    redis.call('HDEL', K_XFER, 'cart|' .. r.reservation_id)
    gc_later('r|' .. r.reservation_id)
  end
  return reply(reservation_view(r))
end

return refuse('bad_argument', { reason = 'action' })
