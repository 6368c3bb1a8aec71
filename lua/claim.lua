-- claim: the one idempotency record of a reservation request, per
-- (merchant, Idempotency-Key), in the partition of that pair, wherever the
-- hold lands (the pool, any node's bucket, a cart's lines). The key is
-- known here only as ARGS.digest, a keyed hash (no client text is stored).
-- ARGS.action:
--   open     first use: records ARGS.fingerprint, ARGS.life, the placement (ARGS.cell,
--            ARGS.cell_partition, ARGS.reservation_id: where and as what
--            the first attempt holds; or ARGS.plan, JSON text: the holds
--            of a request of several, each with its cell and id) and a lease of ARGS.lease_ms for this
--            node; answers claimed {attempt 0, token, lease_until_ms}. Later uses: done
--            {reply} once finished (the stored answer, success or refusal);
--            in_progress {until_ms, placement} while another caller's
--            lease lasts;
--            else the caller takes the claim over: claimed {attempt, token,
--            placement, taken_over}, and must run that same attempt again.
--            Another fingerprint: idempotency_key_reused. With
--            ARGS.existing_only, no claim is made: not_found.
--   advance  the attempt with ARGS.token was abandoned (a cart rolled back):
--            the next one uses fresh line ids, and has no plan until the
--            `plan` action records one; the abandoned plan is kept as
--            `abandoned` (answered to a caller taking over, which
--            releases its holds). lost if the token is stale.
--   plan     records ARGS.plan as the holds of the current attempt
--            (ARGS.attempt) of the caller with ARGS.token, before it makes
--            them: a plan grown after a refusal, the plan of the attempt
--            after an abandoned one, or one made by a caller that
--            took over a claim recorded without one. lost if the token or
--            the attempt is stale.
--   finish   stores ARGS.reply (JSON text) as the answer; done {reply}; a
--            claim finished before answers its stored reply; lost if
--            ARGS.token is stale.
-- Claims answer for CLAIM_LIFE_MS from their first use (then a use is a
-- first use again) and are deleted RETENTION_MS after it.
local a = ARGS
if type(a.digest) ~= 'string' or not a.digest:match('^%x+$') or #a.digest ~= 64 then
  return refuse('bad_argument', { reason = 'digest' })
end
local field = 'c|' .. a.digest
local raw = redis.call('HGET', K_IDEM, field)
local rec = raw and cjson.decode(raw) or nil
-- A claim is over CLAIM_LIFE_MS after its first use, whenever the gc gets
-- to deleting it (a quiet partition's gc lags): the hold that answers a
-- one-line request is kept RETENTION_MS after it ends, by its own shard's
-- clock, so it outlives every claim that may answer from it.
local CLAIM_LIFE_MS = RETENTION_MS - 10 * 60 * 1000
-- A plan of the most holds a reservation makes (256), each with ids of the
-- longest (128 characters), fits.
local PLAN_BYTES_MAX = 262144
if rec and NOW >= (rec.created_at_ms or 0) + CLAIM_LIFE_MS then rec = nil end
-- Every id a request makes derives from its digest and its claim's life
-- (ARGS.life, proposed by the caller that creates the claim, kept in it):
-- a key used again after its claim's life makes new ids, never the ones of
-- holds, carts and lines the first life left (they are kept longer).

if a.action == 'open' then
  if type(a.fingerprint) ~= 'string' or #a.fingerprint < 1 or #a.fingerprint > 128
    or not is_int(a.lease_ms, 1, 600000) then
    return refuse('bad_argument', { reason = 'fingerprint and lease_ms' })
  end
  -- A placement is all three fields or none (the record keeps it only
  -- when it names a cell).
  if (a.cell ~= nil or a.cell_partition ~= nil or a.reservation_id ~= nil)
    and (not is_cell_id(a.cell) or not is_int(a.cell_partition, 0, LIMITS.partition_max)
    or not is_id(a.reservation_id)) then
    return refuse('bad_argument', { reason = 'placement' })
  end
  if not is_id(a.life) then return refuse('bad_argument', { reason = 'life' }) end
  if a.plan ~= nil and (type(a.plan) ~= 'string' or #a.plan > PLAN_BYTES_MAX) then
    return refuse('bad_argument', { reason = 'plan' })
  end
  if not rec and a.existing_only then return refuse('not_found') end
  if not rec then
    -- The first use, once per request: the record and the reply are built
    -- as text (what cjson would write for the same fields) from values
    -- checked above (node, life, reservation id: is_id; cell: is_cell_id;
    -- nothing in them needs escaping; the fingerprint is encoded).
    housekeeping()
    local lease_until_ms = NOW + a.lease_ms
    local placement = ''
    if a.cell ~= nil then
      placement = string.format(',"cell":"%s","cell_partition":%d,"reservation_id":"%s"',
        a.cell, a.cell_partition, a.reservation_id)
    end
    -- A plan is recorded (and answered) as the text the caller sent. A
    -- request of several holds is marked planned, with its first plan or
    -- none (a plan that placed nothing).
    if a.plan ~= nil then placement = placement .. ',"plan":' .. cjson.encode(a.plan) end
    if a.planned == true then placement = placement .. ',"planned":true' end
    redis.call('HSET', K_IDEM, field, string.format(
      '{"fp":%s,"state":"pending","attempt":0,"token":1,"owner":"%s","lease_until_ms":%d,"created_at_ms":%d,"life":"%s"',
      cjson.encode(a.fingerprint), ARGS.node, lease_until_ms, NOW, a.life) .. placement .. '}')
    gc_later('i|' .. field)
    return string.format(
      '{"v":%d,"status":"claimed","attempt":0,"token":1,"taken_over":false,"lease_until_ms":%d,"life":"%s"',
      REPLY_VERSION, lease_until_ms, a.life) .. placement .. '}'
  end
  if rec.fp ~= a.fingerprint then return refuse('idempotency_key_reused') end
  if rec.state == 'done' then return reply({ status = 'done', reply = rec.reply }) end
  if rec.lease_until_ms > NOW then
    return reply({ status = 'in_progress', until_ms = rec.lease_until_ms, life = rec.life,
      cell = rec.cell, cell_partition = rec.cell_partition, reservation_id = rec.reservation_id })
  end
  rec.token = rec.token + 1
  rec.owner = ARGS.node
  rec.lease_until_ms = NOW + a.lease_ms
  redis.call('HSET', K_IDEM, field, cjson.encode(rec))
  return reply({ status = 'claimed', attempt = rec.attempt, token = rec.token, taken_over = true,
    lease_until_ms = rec.lease_until_ms, life = rec.life,
    cell = rec.cell, cell_partition = rec.cell_partition, reservation_id = rec.reservation_id,
    plan = rec.plan, planned = rec.planned, abandoned = rec.abandoned })
end

-- A claim past its life was another request's: this caller's token is stale.
if not rec then
  if raw then return reply({ status = 'lost' }) end
  return refuse('not_found')
end
if not is_int(a.token, 1, 99999999999999) then return refuse('bad_argument', { reason = 'token' }) end

if a.action == 'advance' then
  if rec.state ~= 'pending' or rec.token ~= a.token then return reply({ status = 'lost' }) end
  if not is_int(a.lease_ms, 1, 600000) then return refuse('bad_argument', { reason = 'lease_ms' }) end
  rec.attempt = rec.attempt + 1
  -- Kept until the next abandonment: a caller that takes the claim over
  -- releases its holds (the caller that abandoned it may have died first).
  rec.abandoned = rec.plan
  rec.plan = nil
  rec.lease_until_ms = NOW + a.lease_ms
  redis.call('HSET', K_IDEM, field, cjson.encode(rec))
  return reply({ status = 'ok', attempt = rec.attempt, lease_until_ms = rec.lease_until_ms })
end

if a.action == 'plan' then
  if rec.state ~= 'pending' or rec.token ~= a.token or rec.attempt ~= a.attempt then
    return reply({ status = 'lost' })
  end
  if type(a.plan) ~= 'string' or #a.plan > PLAN_BYTES_MAX then return refuse('bad_argument', { reason = 'plan' }) end
  rec.plan = a.plan
  redis.call('HSET', K_IDEM, field, cjson.encode(rec))
  return reply({ status = 'ok' })
end

if a.action == 'finish' then
  if rec.state == 'done' then return reply({ status = 'done', reply = rec.reply }) end
  if rec.token ~= a.token then return reply({ status = 'lost' }) end
  if type(a.reply) ~= 'string' or #a.reply > 262144 then
    return refuse('bad_argument', { reason = 'reply' })
  end
  rec.state = 'done'
  rec.reply = a.reply
  rec.lease_until_ms = 0
  redis.call('HSET', K_IDEM, field, cjson.encode(rec))
  return reply({ status = 'done', reply = rec.reply })
end

return refuse('bad_argument', { reason = 'action' })
