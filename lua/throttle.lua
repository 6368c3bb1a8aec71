-- throttle: the checkout throttle of a flash sale (checkout_attempts_per_second),
-- one token bucket in Redis time shared by the whole fleet, kept in the
-- idempotency hash of the sale key's pool partition as 't|' .. ARGS.sale
-- (deleted RETENTION_MS after its last use). Nodes take tokens in small
-- chunks and spend them locally (allocator/src/throttle.rs).
-- ARGS: sale (the sale's name), per_second (the budget), burst (the
-- bucket's size), want (tokens asked for, 1..burst).
-- Answers ok {granted, wait_ms}: up to `want` tokens, or none and the ms
-- until `want` are there (so the next call takes a whole chunk). A changed
-- budget applies from this call on; the tokens already in the bucket stay
-- (up to the new burst).
local a = ARGS
if not is_id(a.sale) or not is_int(a.per_second, 1, LIMITS.count_qty_max)
  or not is_int(a.burst, 1, LIMITS.count_qty_max) or not is_int(a.want, 1, a.burst) then
  return refuse('bad_argument', { reason = 'sale, per_second, burst and want' })
end
local field = 't|' .. a.sale
local raw = redis.call('HGET', K_IDEM, field)
local tokens = a.burst
if raw then
  local rec = cjson.decode(raw)
  -- Redis time can step back (a failover to a replica whose clock is
  -- behind): no refill then, and it refills from the new time on, so it
  -- fills at the budget in real time across the step (keeping the later
  -- time instead would refuse everything until the clock caught up).
  tokens = math.min(a.burst, rec.tokens + math.max(0, NOW - rec.at_ms) * a.per_second / 1000)
end
local granted = math.min(a.want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', K_IDEM, field, cjson.encode({ tokens = tokens, at_ms = NOW }))
gc_later('i|' .. field)
local wait_ms = 0
if granted == 0 then wait_ms = math.ceil((a.want - tokens) * 1000 / a.per_second) end
return reply({ status = 'ok', granted = granted, wait_ms = wait_ms })
