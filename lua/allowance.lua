-- allowance: a customer's allowance in a flash sale with customer limits
-- (customer_units_max, customer_holds_max), counted across the whole fleet
-- (allocator/src/allowance.rs has the design). Kept in the partition of the
-- pair (sale scope, keyed hash of customer_ref): no client text.
--   K_IDEM 'a|' .. ARGS.allowance   {units, holds}: units held or bought,
--                                   holds active, over the sale
--   K_IDEM 'g|' .. grant            one hold's share {state, qty, allowance,
--                                   takes, until_ms}; state 'taken' (counted,
--                                   its hold made or about to be), 'ended'
--                                   (its hold ended and was settled) or
--                                   'given' (given back: its hold was refused
--                                   or never landed; a take counts it anew)
--   K_XFER 'grant|' .. grant        {grant, until_ms, take}: a taken grant the
--                                   reconciler looks at once until_ms is long
--                                   past (its hold may not have landed, or
--                                   may have ended without a note)
-- A grant's id is the id of the hold it pays for. ARGS.action:
--   take    before the hold: counts ARGS.qty units and one hold for grant
--           ARGS.grant, unless that passes ARGS.units_max or ARGS.holds_max:
--           customer_limit {limit, used, counts}. A grant taken before (the
--           same attempt run again after a takeover) is answered as it is,
--           counting nothing again (also when it was taken under another
--           allowance: a sale whose start moved); a taken one gets
--           ARGS.until_ms (the new caller's lease, the later one kept) and a
--           new take number. A given-back one is counted anew, with a new
--           take number (take numbers of a grant never repeat, so a stale
--           give cannot match a later take). Answers ok {take, state}.
--   give    the hold was refused, or never landed, or is gone (the
--           reconciler's repair): gives the grant's units and hold back and
--           marks it given (the attempt may run again and take anew), only if
--           it is taken and its take number is still ARGS.take (no caller
--           took it over since).
--   settle  the hold ended (ARGS.op release, expire or commit): gives the
--           hold back, and the units unless it was a commit; the grant is
--           kept as ended (a replay of its attempt takes nothing again) and
--           deleted RETENTION_MS later. Idempotent.
--   confirm the grant's hold was found held: the repair looks again at
--           ARGS.check_at_ms (when the hold ends), unless ARGS.take is no
--           longer the grant's take number (then the next take's lease
--           decides).
--   read    the allowance ARGS.allowance: ok {units, holds}.
--   note_done in a hold's partition: the note its end left is settled.
local a = ARGS
if a.action == 'note_done' then
  if not is_id(a.grant) then return refuse('bad_argument', { reason = 'grant' }) end
  redis.call('HDEL', K_XFER, 'allow|' .. a.grant)
  return reply({ status = 'ok' })
end
if a.action == 'read' then
  if type(a.allowance) ~= 'string' then return refuse('bad_argument', { reason = 'allowance' }) end
  local rawa = redis.call('HGET', K_IDEM, 'a|' .. a.allowance)
  local rec = rawa and cjson.decode(rawa) or { units = 0, holds = 0 }
  return reply({ status = 'ok', units = rec.units, holds = rec.holds })
end

if not is_id(a.grant) then return refuse('bad_argument', { reason = 'grant' }) end
local gfield = 'g|' .. a.grant
local raw = redis.call('HGET', K_IDEM, gfield)
local g = raw and cjson.decode(raw) or nil

-- A sale with no end keeps a customer's allowance this long after its last
-- use (one with an end, RETENTION_MS past the end).
local NO_END_KEEP_MS = 30 * 24 * 3600 * 1000

-- The allowance of grant `g` with `units` and `holds` (negative: given
-- back) added. Its deletion is put off, never brought forward (GT).
local function add(g, units, holds)
  local field = 'a|' .. g.allowance
  local rawa = redis.call('HGET', K_IDEM, field)
  local rec = rawa and cjson.decode(rawa) or { units = 0, holds = 0 }
  rec.units = math.max(0, rec.units + units)
  rec.holds = math.max(0, rec.holds + holds)
  redis.call('HSET', K_IDEM, field, cjson.encode(rec))
  local keep_until = NOW + NO_END_KEEP_MS
  if (g.keep_ms or 0) > 0 then keep_until = math.max(NOW, g.keep_ms) + RETENTION_MS end
  redis.call('ZADD', K_GC, 'GT', int_text(keep_until), 'i|' .. field)
  return rec
end

local function watch(g)
  redis.call('HSET', K_XFER, 'grant|' .. a.grant,
    cjson.encode({ grant = a.grant, until_ms = g.until_ms, take = g.takes }))
end

-- Ends taken grant `g` as `state` ('given' or 'ended'), giving back
-- `units` and its hold; the record goes RETENTION_MS later, the watch now.
local function close(g, state, units)
  add(g, -units, -1)
  g.state = state
  redis.call('HSET', K_IDEM, gfield, cjson.encode(g))
  gc_later('i|' .. gfield)
  redis.call('HDEL', K_XFER, 'grant|' .. a.grant)
end

local function over_limit(rec)
  if a.units_max ~= nil and rec.units + a.qty > a.units_max then
    return refuse('customer_limit', { limit = a.units_max, used = rec.units, counts = 'units' })
  end
  if a.holds_max ~= nil and rec.holds + 1 > a.holds_max then
    return refuse('customer_limit', { limit = a.holds_max, used = rec.holds, counts = 'holds' })
  end
  return nil
end

if a.action == 'take' then
  if type(a.allowance) ~= 'string' or #a.allowance < 1 or #a.allowance > 300
    or not is_int(a.qty, 1, LIMITS.qty_max) or not is_int(a.until_ms, 0, 99999999999999)
    or not is_int(a.keep_ms, 0, 99999999999999)
    or (a.units_max ~= nil and not is_int(a.units_max, 1, LIMITS.count_qty_max))
    or (a.holds_max ~= nil and not is_int(a.holds_max, 1, LIMITS.count_qty_max)) then
    return refuse('bad_argument', { reason = 'allowance, qty, until_ms, keep_ms and limits' })
  end
  if g and g.qty ~= a.qty then
    return refuse('bad_argument', { reason = 'grant already used' })
  end
  if g and g.state == 'taken' and g.allowance == a.allowance then
    g.takes = g.takes + 1
    g.until_ms = math.max(g.until_ms, a.until_ms)
    redis.call('HSET', K_IDEM, gfield, cjson.encode(g))
    watch(g)
    return reply({ status = 'ok', take = g.takes, state = g.state, replayed = true })
  end
  if g and g.state ~= 'given' then
    -- Ended, or counted under another allowance: nothing to count again.
    return reply({ status = 'ok', take = g.takes, state = g.state, replayed = true })
  end
  housekeeping()
  local rawa = redis.call('HGET', K_IDEM, 'a|' .. a.allowance)
  local refusal = over_limit(rawa and cjson.decode(rawa) or { units = 0, holds = 0 })
  if refusal then return refusal end
  local takes = g and (g.takes + 1) or 1
  g = { state = 'taken', qty = a.qty, allowance = a.allowance, takes = takes, until_ms = a.until_ms,
    keep_ms = a.keep_ms }
  add(g, a.qty, 1)
  redis.call('HSET', K_IDEM, gfield, cjson.encode(g))
  -- A given-back grant's deletion was scheduled: it is live again.
  redis.call('ZREM', K_GC, 'i|' .. gfield)
  watch(g)
  return reply({ status = 'ok', take = takes, state = 'taken' })
end

if a.action == 'give' then
  if not is_int(a.take, 1, 99999999999999) then return refuse('bad_argument', { reason = 'take' }) end
  if not g or g.state ~= 'taken' or g.takes ~= a.take then
    return reply({ status = 'ok', given = false })
  end
  close(g, 'given', g.qty)
  return reply({ status = 'ok', given = true })
end

if a.action == 'settle' then
  if a.op ~= 'release' and a.op ~= 'expire' and a.op ~= 'commit' then
    return refuse('bad_argument', { reason = 'op' })
  end
  if not g or g.state ~= 'taken' then return reply({ status = 'ok', settled = false }) end
  g.ended = a.op
  -- A commit keeps its units counted: bought is bought.
  close(g, 'ended', a.op == 'commit' and 0 or g.qty)
  return reply({ status = 'ok', settled = true })
end

if a.action == 'confirm' then
  if not is_int(a.take, 1, 99999999999999) or not is_int(a.check_at_ms, 0, 99999999999999) then
    return refuse('bad_argument', { reason = 'take and check_at_ms' })
  end
  if not g or g.state ~= 'taken' then
    redis.call('HDEL', K_XFER, 'grant|' .. a.grant)
  elseif g.takes == a.take then
    redis.call('HSET', K_XFER, 'grant|' .. a.grant,
      cjson.encode({ grant = a.grant, until_ms = a.check_at_ms, take = g.takes }))
  end
  return reply({ status = 'ok' })
end

return refuse('bad_argument', { reason = 'action' })
