-- reserve_batch: holds on one cell for one or more requests in one call (a
-- single hold is a batch of one; the gateway coalesces concurrent requests
-- on a hot cell). Each request gets its own answer, exactly as if it ran
-- alone, in order.
-- ARGS.cell: the cell (pool or bucket) of this partition; ARGS.count: the
-- number of requests (1..LIMITS.reserve_batch_max), whose fields follow in
-- ARGV (see hold_requests in lib.lua).
-- Reply: {status 'batch', now_ms, answers} (see reserve_many).
if not is_cell_id(ARGS.cell) then return refuse('bad_argument', { reason = 'cell' }) end
if not is_int(ARGS.count, 1, LIMITS.reserve_batch_max)
  or #ARGV ~= HOLD_ARGV_FIRST - 1 + ARGS.count * HOLD_FIELDS then
  return refuse('bad_argument', { reason = 'count' })
end
housekeeping()
return reply({ status = 'batch', now_ms = NOW, answers = reserve_many(hold_requests()) })
