-- get_reservation: the reservation as it stands now (a due hold is expired
-- first, so a reader never sees a dead hold as held).
if not is_id(ARGS.reservation_id) then
  return refuse('bad_argument', { reason = 'reservation_id' })
end
expire_if_due(res_for_caller(ARGS.reservation_id))
housekeeping()
local r = res_for_caller(ARGS.reservation_id)
if not r then return refuse('not_found') end
return reply(reservation_view(r))
