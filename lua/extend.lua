-- extend: a held reservation gets a new expiry, ARGS.ttl_ms from now (the
-- allocator bounds it by the configured maximum). Refused unless held.
-- ARGS: reservation_id, ttl_ms, grace_ms.
if not is_id(ARGS.reservation_id) or not is_int(ARGS.ttl_ms, 1, LIMITS.ttl_ms_max)
  or not is_int(ARGS.grace_ms, 0, LIMITS.grace_ms_max) then
  return refuse('bad_argument', { reason = 'reservation_id, ttl_ms and grace_ms are required' })
end
expire_if_due(res_for_caller(ARGS.reservation_id))
housekeeping()
local r = res_for_caller(ARGS.reservation_id)
if not r or (r.cart_id and not ARGS.cart_flow) then return refuse('not_found') end
if r.status ~= 'held' then
  return refuse('not_held', { reservation_status = r.status })
end
if r.lines and NOW >= r.expires_at_ms then
  return refuse('not_held', { reservation_status = 'expired' })
end
due_remove(r)
-- The expiry the hold was made with: what its request answered, and
-- answers again on every retry (a hold's one home of that answer).
if not r.lines and r.held_expires_at_ms == nil then r.held_expires_at_ms = r.expires_at_ms end
r.expires_at_ms = NOW + ARGS.ttl_ms
r.hold_until_ms = r.expires_at_ms + ARGS.grace_ms
res_put(r)
due_add(r)
if r.lines then return reply(reservation_view(r)) end
local c = cell_get(r.cell)
ledger('extend', r.cell, c.on_hand, c.reserved, c, {
  reservation_id = r.reservation_id, qty = 0, expires_at_ms = r.expires_at_ms,
})
return reply(reservation_view(r))
