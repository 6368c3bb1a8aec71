-- commit: the held units leave the cell's on_hand and reserved. Refused with
-- the reservation's status unless it is held and not expired (fencing: a
-- reservation whose time is up is expired first, so it is never committed).
-- ARGS: reservation_id, idempotency_key? (a keyed hash: no client text), fingerprint, cart_flow (a cart's
-- line, committed after its cart record accepted the commit before expiry: the
-- line's grace period still holds it).
if not is_id(ARGS.reservation_id) or type(ARGS.fingerprint) ~= 'string' then
  return refuse('bad_argument', { reason = 'reservation_id and fingerprint are required' })
end
local replay = idem_replay(ARGS.idempotency_key, ARGS.fingerprint)
if replay then return replay end
expire_if_due(res_for_caller(ARGS.reservation_id))
housekeeping()
local r = res_for_caller(ARGS.reservation_id)
if not r or (r.cart_id and not ARGS.cart_flow) then return refuse('not_found') end
if r.lines then return refuse('bad_argument', { reason = 'carts move through the cart script' }) end
if r.status == 'committed' then
  local view = reservation_view(r)
  local out = reply(view)
  idem_store(ARGS.idempotency_key, ARGS.fingerprint, out)
  return out
end
if r.status ~= 'held' then
  return refuse('not_held', { reservation_status = r.status })
end
finish_hold(r, 'commit')
local out = reply(reservation_view(r))
idem_store(ARGS.idempotency_key, ARGS.fingerprint, out)
return out
