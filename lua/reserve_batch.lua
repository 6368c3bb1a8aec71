-- reserve_batch: several reservations on the partition in one call (the
-- gateway coalesces concurrent requests on a hot cell). Each request gets its
-- own reply, exactly as reserve would give it, in order.
-- ARGS.requests: list of reserve requests (at most LIMITS.reserve_batch_max).
if type(ARGS.requests) ~= 'table' or #ARGS.requests < 1 or #ARGS.requests > LIMITS.reserve_batch_max then
  return refuse('bad_argument', { reason = 'requests' })
end
housekeeping()
local replies = {}
for i, request in ipairs(ARGS.requests) do
  replies[i] = cjson.decode(reserve_one(request))
end
return reply({ status = 'batch', replies = replies })
