-- release: the held units return to sellable. Releasing a released or expired
-- reservation changes nothing and answers its status; a committed one is
-- refused with not_held.
-- ARGS: reservation_id, idempotency_key? (a keyed hash: no client text), fingerprint.
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
  return refuse('not_held', { reservation_status = r.status })
end
local changed = false
if r.status == 'held' then
  finish_hold(r, 'release')
  changed = true
end
local view = reservation_view(r)
view.changed = changed
local out = reply(view)
idem_store(ARGS.idempotency_key, ARGS.fingerprint, out)
return out
