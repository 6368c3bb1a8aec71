-- expire_due: the sweeper's call. Releases up to ARGS.limit due holds of the
-- partition (each exactly once: an expired hold leaves the due set in the same
-- step) and drops retained records past their time.
if not is_int(ARGS.limit, 1, 10000) then
  return refuse('bad_argument', { reason = 'limit' })
end
gc(GC_PER_CALL)
local expired = expire_due(ARGS.limit)
return reply({ status = 'ok', expired = expired, remaining = redis.call('ZCOUNT', K_DUE, '-inf', NOW) })
