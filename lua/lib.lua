-- The stock library: every operation script in lua/ is one function of
-- it. The allocator loads it once per Redis primary as a Redis Function
-- library (FUNCTION LOAD): this file first, then each operation's file as
-- the body of a function registered under the operation's name, which
-- starts with begin(keys, argv). So the helpers below are made once per
-- load, not once per call (the per-call cost of a script that defines them
-- all was most of a cheap call's time).
--
-- Every operation gets the same nine keys, all of one partition (one hash
-- tag, so one Redis Cluster slot), and one JSON argument:
--   KEYS[1] cells         HASH  cell id -> cell JSON
--   KEYS[2] reservations  HASH  reservation id -> reservation (MessagePack)
--   KEYS[3] due           ZSET  held reservation id, score = hold_until_ms
--   KEYS[4] idempotency   HASH  record key -> {fp, reply} (and event dedupe)
--   KEYS[5] sequences     HASH  "stock key|source" -> last applied source_seq
--   KEYS[6] ledger        STREAM the partition's outbox
--   KEYS[7] gc            ZSET  "r|id" / "i|key" / "x|id" to delete, score = delete at ms
--   KEYS[8] transfers     HASH  transfer id -> transfer JSON
--   KEYS[9] due by cell   ZSET  "cell|hold_until_ms (15 digits)|id", score 0:
--                               a cell's due holds in time order (ZRANGEBYLEX)
--   ARGV[1] the request as JSON; ARGV[2] the reply schema version expected;
--   ARGV[3..] plain string arguments of operations that take them
--
-- Replies are JSON objects {"v":1,"status":...}; the allocator decodes them
-- into typed results. Arguments are checked before the first write: Redis does
-- not roll back a script that errors half way.

-- The call being served, set by begin(): Redis runs one call at a time, and
-- every call starts with begin(), so these never carry over between calls.
local KEYS, ARGV, ARGS, NOW
local K_CELLS, K_RES, K_DUE, K_IDEM, K_SEQ, K_LEDGER, K_GC, K_XFER, K_DUE_CELL
local REPLY_VERSION = 1
local LEDGER_VERSION = 1
-- Terminal reservations and idempotency records live this long, then go.
local RETENTION_MS = 24 * 3600 * 1000
-- Work a script does on behalf of others (expiry, gc) is bounded per call.
local EXPIRE_PER_CALL = 64
-- Due holds of the cell a script decides on are all released first; this
-- bounds one call's work (a backlog this deep is the sweeper's to clear).
local EXPIRE_CELL_MAX = 5000
local GC_PER_CALL = 32
-- A transfer is credited only this long after its debit. Credit records
-- (`in|id`) are kept RETENTION_MS after the credit, which is after the debit,
-- so every credit attempt either finds the record (and changes nothing) or
-- comes too late and is refused: no credit ever outlives its dedupe record.
local CREDIT_WINDOW_MS = 12 * 3600 * 1000
-- Lua's cjson writes at most 14 significant digits: integers that may be
-- larger (source sequences) leave a script as decimal strings.
local function int_text(n)
  return string.format('%d', n)
end

-- A JSON object's text without its closing brace, for fields to be
-- appended to it (`json_id_field`, integers): t must not be empty.
local function json_prefix(t)
  return cjson.encode(t):sub(1, -2)
end

-- `,"name":"value"` for an id that is_id passed (nothing in it needs
-- escaping), or '' when there is none.
local function json_id_field(name, value)
  if value == nil then return '' end
  return ',"' .. name .. '":"' .. value .. '"'
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function reply(t)
  t.v = REPLY_VERSION
  return cjson.encode(t)
end

local function refuse(status, t)
  t = t or {}
  t.status = status
  return reply(t)
end

local function is_id(s)
  return type(s) == 'string' and #s >= 1 and #s <= LIMITS.id_length_max and not s:find('[^%w%._:%-]')
end

local function is_int(n, lo, hi)
  return type(n) == 'number' and n == math.floor(n) and n >= lo and n <= hi
end

local function is_cell_id(s)
  return type(s) == 'string' and #s >= 7 and #s <= 600 and not s:find('[^%w%._:%-|]')
end

-- Starts a call: its keys, arguments and time. A refusal (JSON) when the
-- arguments cannot be served, else nil.
local function begin(keys, argv)
  KEYS, ARGV, ARGS = keys, argv, nil
  K_CELLS, K_RES, K_DUE, K_IDEM, K_SEQ, K_LEDGER, K_GC, K_XFER, K_DUE_CELL =
    keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7], keys[8], keys[9]
  NOW = now_ms()
  if argv[2] ~= tostring(REPLY_VERSION) then
    return refuse('bad_argument', { reason = 'reply version ' .. tostring(argv[2]) .. ' not supported' })
  end
  local ok_args, args = pcall(cjson.decode, argv[1] or '')
  if not ok_args or type(args) ~= 'table' then
    return refuse('bad_argument', { reason = 'argument is not a JSON object' })
  end
  ARGS = args
  if not is_int(ARGS.partition, 0, LIMITS.partition_max) or not is_id(ARGS.node) then
    return refuse('bad_argument', { reason = 'partition and node are required' })
  end
  return nil
end

-- Cells -----------------------------------------------------------------

local function cell_get(id)
  local raw = redis.call('HGET', K_CELLS, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function cell_put(id, c)
  c.touched_ms = NOW
  redis.call('HSET', K_CELLS, id, cjson.encode(c))
end

local function sellable(c)
  return c.on_hand - c.reserved - c.safety_stock
end

-- Whether a drain of the key's buckets is under way (the pool's lease).
local function drain_live(c)
  return (c.drain_until_ms or 0) > NOW
end

-- Whether a pool has lent units to buckets (it keeps their node -> partition).
local function has_buckets(c)
  return type(c.buckets) == 'table' and next(c.buckets) ~= nil
end

-- The invariant of DESIGN.md for every change a request makes: checked on the
-- new values before they are written.
local function assert_cell(c, id)
  if c.reserved < 0 or sellable(c) < -c.backorder_limit then
    error('invariant broken on ' .. id .. ': ' .. cjson.encode(c))
  end
end

local function new_cell(a, kind)
  return {
    merchant = a.merchant, sku = a.sku, location = a.location, kind = kind,
    node = a.bucket_node, on_hand = 0, reserved = 0, safety_stock = 0,
    backorder_limit = 0, low_stock_threshold = -1, version = 0,
  }
end

-- Ledger and notifications ----------------------------------------------

-- The fields of a ledger entry (schema in the allocator crate's docs) that
-- name the operation, its cell and the call, set on `e`: every entry has
-- them, whether ledger() writes it or reserve_many builds it as text.
local function ledger_common(e, op, cell_id, c)
  e.v = LEDGER_VERSION
  e.op = op
  e.partition = ARGS.partition
  e.cell = cell_id
  e.merchant = c.merchant
  e.sku = c.sku
  e.location = c.location
  e.node = ARGS.node
  e.at_ms = NOW
  return e
end

-- Appends one ledger entry and returns its stream id. `before`/`after` are
-- the cell's values around the change.
local function ledger(op, cell_id, c_before_on_hand, c_before_reserved, c, extra)
  local e = ledger_common(extra or {}, op, cell_id, c)
  e.on_hand_before = c_before_on_hand
  e.on_hand_after = c.on_hand
  e.reserved_before = c_before_reserved
  e.reserved_after = c.reserved
  e.version = c.version
  return redis.call('XADD', K_LEDGER, '*', 'e', cjson.encode(e))
end

local function notify(cell_id, c)
  -- The partition's shard channel (allocator::keys::changes_channel): the
  -- cells key's name with `changes` for `cells`, so it shares its slot.
  redis.call('SPUBLISH', K_CELLS:sub(1, -6) .. 'changes', cjson.encode({
    partition = ARGS.partition, cell = cell_id, merchant = c.merchant, sku = c.sku,
    location = c.location, version = c.version,
  }))
end

-- Reservations ----------------------------------------------------------

-- Reservation records are read as MessagePack maps or JSON objects (these
-- start with '{', which a MessagePack map never does), and written as JSON
-- for now: a release that wrote MessagePack would leave the nodes of the
-- release before it (JSON only) unable to read them during a rolling
-- deploy. Packing one costs about half of what JSON does on the hot path;
-- once every node reads both, a later release can write MessagePack.
local function res_encode(r)
  return cjson.encode(r)
end

local function res_decode(raw)
  if raw:byte(1) == 123 then return cjson.decode(raw) end
  return cmsgpack.unpack(raw)
end

local function res_get(id)
  local raw = redis.call('HGET', K_RES, id)
  if not raw then return nil end
  return res_decode(raw)
end

-- The reservation as the caller may see it: another merchant's reservation
-- does not exist for it (ARGS.merchant absent means the platform).
local function res_for_caller(id)
  local r = res_get(id)
  if r and ARGS.merchant ~= nil and r.merchant ~= ARGS.merchant then return nil end
  return r
end

local function res_put(r)
  redis.call('HSET', K_RES, r.reservation_id, res_encode(r))
end

local function due_member(r)
  return r.cell .. '|' .. string.format('%015d', r.hold_until_ms) .. '|' .. r.reservation_id
end

-- Indexes a held reservation as due at r.hold_until_ms (partition-wide, and
-- per cell for line holds).
local function due_add(r)
  redis.call('ZADD', K_DUE, r.hold_until_ms, r.reservation_id)
  if r.cell then redis.call('ZADD', K_DUE_CELL, 0, due_member(r)) end
end

local function due_remove(r)
  redis.call('ZREM', K_DUE, r.reservation_id)
  if r.cell then redis.call('ZREM', K_DUE_CELL, due_member(r)) end
end

local function gc_later(member)
  redis.call('ZADD', K_GC, int_text(NOW + RETENTION_MS), member)
end

-- Ends a held reservation: `op` is 'release' or 'expire' (units return to
-- sellable) or 'commit' (units leave on_hand). Writes the ledger entry.
local function finish_hold(r, op, extra)
  local c = cell_get(r.cell)
  if not c then error('reservation ' .. r.reservation_id .. ' points at missing cell ' .. r.cell) end
  local on_hand_before, reserved_before = c.on_hand, c.reserved
  c.reserved = c.reserved - r.qty
  if op == 'commit' then c.on_hand = c.on_hand - r.qty end
  c.version = c.version + 1
  if c.reserved < 0 then error('reserved below zero on ' .. r.cell) end
  cell_put(r.cell, c)
  r.status = ({ release = 'released', expire = 'expired', commit = 'committed' })[op]
  r.finished_at_ms = NOW
  res_put(r)
  due_remove(r)
  gc_later('r|' .. r.reservation_id)
  local e = extra or {}
  e.reservation_id = r.reservation_id
  e.qty = r.qty
  e.cart_id = r.cart_id
  ledger(op, r.cell, on_hand_before, reserved_before, c, e)
  notify(r.cell, c)
  if r.allow_p then
    -- A hold a customer's allowance paid for (allowance.lua): the note of
    -- its end, settled in the allowance's partition by the caller that
    -- ended it or by the reconciler, then deleted.
    redis.call('HSET', K_XFER, 'allow|' .. r.reservation_id, string.format(
      '{"grant":"%s","allow_p":%d,"op":"%s","at_ms":%d}', r.reservation_id, r.allow_p, op, NOW))
  end
  return c
end

-- Ends a held reservation whose time is up: a cart record is marked expired
-- (its lines expire on their own after their grace); a line's units return.
local function expire_record(r)
  if r.lines then
    r.status = 'expired'
    r.finished_at_ms = NOW
    res_put(r)
    redis.call('ZREM', K_DUE, r.reservation_id)
    gc_later('r|' .. r.reservation_id)
  else
    finish_hold(r, 'expire')
  end
end

-- Fencing for operations on one reservation: if its time is up it is expired
-- now, whatever backlog of due holds the partition has. A cart is due at its
-- advertised expiry, a line at the end of its hold (expiry plus grace).
local function expire_if_due(r)
  if r and r.status == 'held' then
    local due_at = r.hold_until_ms
    if r.lines then due_at = r.expires_at_ms end
    if NOW >= due_at then
      expire_record(r)
      return true
    end
  end
  return false
end

-- Lazy expiry: every script releases the partition's oldest due holds (a
-- bounded number) before it decides anything; decisions on one cell or one
-- reservation also release exactly theirs (expire_cell_due, expire_if_due).
local function expire_due(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_DUE, '-inf', NOW, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local r = res_get(id)
    if r and r.status == 'held' then
      expire_record(r)
    elseif r then
      due_remove(r)
    else
      redis.call('ZREM', K_DUE, id)
    end
  end
  return #ids
end

-- Releases every due hold of one cell (up to EXPIRE_CELL_MAX), so a decision
-- on that cell never counts a dead hold, whatever backlog the partition has.
local function expire_cell_due(cell_id)
  local members = redis.call('ZRANGEBYLEX', K_DUE_CELL, '[' .. cell_id .. '|',
    '(' .. cell_id .. '|' .. string.format('%015d', NOW + 1), 'LIMIT', 0, EXPIRE_CELL_MAX)
  for _, member in ipairs(members) do
    local id = member:match('|([^|]+)$')
    local r = id and res_get(id)
    if r and r.status == 'held' then
      finish_hold(r, 'expire')
    else
      redis.call('ZREM', K_DUE_CELL, member)
      if id then redis.call('ZREM', K_DUE, id) end
    end
  end
end

local function gc(limit)
  local members = redis.call('ZRANGEBYSCORE', K_GC, '-inf', NOW, 'LIMIT', 0, limit)
  for _, m in ipairs(members) do
    local kind, id = m:sub(1, 1), m:sub(3)
    if kind == 'r' then
      redis.call('HDEL', K_RES, id)
    elseif kind == 'x' then
      redis.call('HDEL', K_XFER, id)
    else
      redis.call('HDEL', K_IDEM, id)
    end
    redis.call('ZREM', K_GC, m)
  end
end

-- Idempotency -----------------------------------------------------------

-- The stored reply for `key` if the same request ran before (marked
-- replayed), a refusal if the key came with another request, else nil.
local function idem_replay(key, fingerprint)
  if not key then return nil end
  local raw = redis.call('HGET', K_IDEM, key)
  if not raw then return nil end
  local rec = cjson.decode(raw)
  if rec.fp ~= fingerprint then
    return refuse('idempotency_key_reused')
  end
  local r = cjson.decode(rec.reply)
  r.replayed = true
  return cjson.encode(r)
end

local function idem_store(key, fingerprint, reply_json)
  if not key then return end
  redis.call('HSET', K_IDEM, key, cjson.encode({ fp = fingerprint, reply = reply_json }))
  gc_later('i|' .. key)
end

local function housekeeping()
  gc(GC_PER_CALL)
  expire_due(EXPIRE_PER_CALL)
end

local function reservation_view(r)
  if r.lines then
    return {
      status = r.status, reservation_id = r.reservation_id, merchant = r.merchant,
      expires_at_ms = r.expires_at_ms, lines = r.lines, kind = 'cart',
      partial = r.partial, unfilled = r.unfilled,
    }
  end
  return {
    status = r.status, reservation_id = r.reservation_id, merchant = r.merchant,
    sku = r.sku, location = r.location, cell = r.cell, qty = r.qty,
    backordered = r.backordered, expires_at_ms = r.expires_at_ms,
    hold_until_ms = r.hold_until_ms, cart_id = r.cart_id,
    held_expires_at_ms = r.held_expires_at_ms, allow_p = r.allow_p,
  }
end

-- Checks one hold request of a batch; returns an error reason or nil.
local function check_hold(h)
  if not is_id(h.reservation_id) then return 'reservation_id' end
  if not is_int(h.qty, 1, LIMITS.qty_max) then return 'qty' end
  if not is_int(h.ttl_ms, 1, LIMITS.ttl_ms_max) then return 'ttl_ms' end
  if not is_int(h.grace_ms, 0, LIMITS.grace_ms_max) then return 'grace_ms' end
  if h.cart_id ~= nil and not is_id(h.cart_id) then return 'cart_id' end
  if h.customer_hash ~= nil and #h.customer_hash > 128 then return 'customer_hash' end
  if h.hold_by_ms ~= nil and not is_int(h.hold_by_ms, 0, 99999999999999) then return 'hold_by_ms' end
  if h.allow_p ~= nil and not is_int(h.allow_p, 0, LIMITS.partition_max) then return 'allow_p' end
  return nil
end

-- Where a batch's requests start in ARGV, and how many fields each has:
-- reservation id, qty, ttl_ms, grace_ms, customer hash, cart id, hold-by
-- time in ms, the partition of the customer's allowance that paid for the
-- hold (the last four empty when absent). Plain strings: no JSON to decode
-- per request.
local HOLD_ARGV_FIRST = 3
local HOLD_FIELDS = 8

-- The holds ARGS.count requests ask of cell ARGS.cell, from ARGV.
local function hold_requests()
  local holds = {}
  for i = 1, ARGS.count do
    local at = HOLD_ARGV_FIRST + (i - 1) * HOLD_FIELDS
    local customer_hash, cart_id, hold_by = ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
    local allow_p = ARGV[at + 7]
    holds[i] = {
      reservation_id = ARGV[at], qty = tonumber(ARGV[at + 1]), ttl_ms = tonumber(ARGV[at + 2]),
      grace_ms = tonumber(ARGV[at + 3]),
      customer_hash = (customer_hash ~= nil and customer_hash ~= '') and customer_hash or nil,
      cart_id = (cart_id ~= nil and cart_id ~= '') and cart_id or nil,
      -- Text that is not a number stays text, for check_hold to refuse.
      hold_by_ms = (hold_by ~= nil and hold_by ~= '') and (tonumber(hold_by) or hold_by) or nil,
      allow_p = (allow_p ~= nil and allow_p ~= '') and (tonumber(allow_p) or allow_p) or nil,
    }
  end
  return holds
end

-- Holds for every request of a batch on one cell (ARGS.cell of the stock
-- key ARGS.merchant/sku/location), deciding them in order, each exactly as
-- if it ran alone. The cell is read once and written once; the holds, their
-- due-index entries and the change notification are written with one
-- command each for the whole batch; each hold gets its own ledger entry.
--
-- The request's idempotency lives in its claim (claim.lua), which fixed the
-- reservation id and the cell before this runs: a reservation that exists
-- already is this very attempt run again, answered as it stands (replayed).
-- A refusal writes nothing, so running the attempt again decides anew. The
-- caller ran housekeeping() already.
--
-- A request with hold_by_ms makes a new hold only before that Redis time
-- (its claim's lease, less a margin for clocks of other shards): once the
-- lease has lapsed another caller may take the claim over and decide the
-- request, and a late hold of the slow caller must not land after that.
--
-- Answers, one per request, in order (compact: the caller knows what it
-- asked): {'h', backordered} held (expires at NOW + ttl_ms); {'p', view} a
-- reservation that existed (replayed); {'s', available} insufficient stock;
-- {'f'} the bucket is fenced; {'n'} no such cell; {'l'} the request's
-- hold-by time has passed; {'b', reason} a bad request.
local function reserve_many(holds)
  local cell_id = ARGS.cell
  local answers = {}
  local ids = {}
  for i, h in ipairs(holds) do
    local bad = check_hold(h)
    if bad then answers[i] = { 'b', bad } else ids[#ids + 1] = h.reservation_id end
  end
  -- Attempts run again: answered as their reservation stands (expired
  -- first if its time is up, never shown as held).
  local existing = {}
  if #ids > 0 then
    local raws = redis.call('HMGET', K_RES, unpack(ids))
    for j, raw in ipairs(raws) do
      if raw then existing[ids[j]] = res_decode(raw) end
    end
  end
  for i, h in ipairs(holds) do
    local r = not answers[i] and existing[h.reservation_id]
    if r then
      if r.cell ~= cell_id or r.qty ~= h.qty then
        answers[i] = { 'b', 'reservation_id already used' }
      else
        expire_if_due(r)
        local view = reservation_view(r)
        view.replayed = true
        answers[i] = { 'p', view }
      end
    end
  end
  expire_cell_due(cell_id)
  local c = cell_get(cell_id)
  local on_hand_before, reserved_before, version_before
  if c then on_hand_before, reserved_before, version_before = c.on_hand, c.reserved, c.version end
  local held = {}
  local decided = {}
  for i, h in ipairs(holds) do
    if answers[i] then
      -- answered above
    elseif decided[h.reservation_id] then
      -- The same attempt twice in one batch: the second sees the first.
      local first = decided[h.reservation_id]
      if first.qty ~= h.qty then
        answers[i] = { 'b', 'reservation_id already used' }
      else
        local view = reservation_view(first)
        view.replayed = true
        answers[i] = { 'p', view }
      end
    elseif h.hold_by_ms ~= nil and NOW >= h.hold_by_ms then
      answers[i] = { 'l' }
    elseif not c then
      answers[i] = { 'n' }
    elseif c.fenced then
      -- A fenced bucket sells nothing: its key is being counted, is short,
      -- or its units were taken back; the pool decides until a refill
      -- reopens it.
      answers[i] = { 'f' }
    else
      local available = sellable(c)
      if available - h.qty < -c.backorder_limit then
        answers[i] = { 's', available > 0 and available or 0 }
      else
        local backordered = h.qty
        if available > 0 then backordered = h.qty - available end
        if backordered < 0 then backordered = 0 end
        c.reserved = c.reserved + h.qty
        c.version = c.version + 1
        assert_cell(c, cell_id)
        local r = {
          reservation_id = h.reservation_id, merchant = c.merchant, sku = c.sku,
          location = c.location, cell = cell_id, partition = ARGS.partition, qty = h.qty,
          backordered = backordered, status = 'held', created_at_ms = NOW,
          expires_at_ms = NOW + h.ttl_ms, hold_until_ms = NOW + h.ttl_ms + h.grace_ms,
          node = ARGS.node, cart_id = h.cart_id, customer_hash = h.customer_hash,
          allow_p = h.allow_p,
        }
        decided[h.reservation_id] = r
        held[#held + 1] = r
        answers[i] = { 'h', backordered }
      end
    end
  end
  if #held == 0 then return answers end
  -- Every decision is made and checked: now the writes. The records and
  -- ledger entries are JSON built from a prefix cjson encodes once per batch
  -- (the cell's names, escaped there) and, per hold, only integers and ids
  -- that check_hold passed (is_id: no character JSON escapes): the same
  -- documents as cjson's, at a fraction of its cost per hold. Integers go
  -- through string.format's %d (Lua's own number-to-text is %.14g, a
  -- floating-point print that was a tenth of a batch's time).
  cell_put(cell_id, c)
  local record_prefix = json_prefix({
    merchant = c.merchant, sku = c.sku, location = c.location, cell = cell_id,
    partition = ARGS.partition, status = 'held', created_at_ms = NOW, node = ARGS.node,
  })
  local records, due, due_cell = {}, {}, {}
  for _, r in ipairs(held) do
    records[#records + 1] = r.reservation_id
    records[#records + 1] = record_prefix .. string.format(
      ',"reservation_id":"%s","qty":%d,"backordered":%d,"expires_at_ms":%d,"hold_until_ms":%d',
      r.reservation_id, r.qty, r.backordered, r.expires_at_ms, r.hold_until_ms)
      .. json_id_field('cart_id', r.cart_id)
      .. (r.customer_hash and (',"customer_hash":' .. cjson.encode(r.customer_hash)) or '')
      .. (r.allow_p and string.format(',"allow_p":%d', r.allow_p) or '') .. '}'
    due[#due + 1] = int_text(r.hold_until_ms)
    due[#due + 1] = r.reservation_id
    due_cell[#due_cell + 1] = 0
    due_cell[#due_cell + 1] = due_member(r)
  end
  redis.call('HSET', K_RES, unpack(records))
  redis.call('ZADD', K_DUE, unpack(due))
  redis.call('ZADD', K_DUE_CELL, unpack(due_cell))
  -- One entry per hold, with the cell's values around that hold (the
  -- fields ledger() writes for a reserve: a hold leaves on_hand as it was).
  local common = ledger_common({}, 'reserve', cell_id, c)
  common.on_hand_before = on_hand_before
  common.on_hand_after = c.on_hand
  local entry_prefix = json_prefix(common)
  local reserved, version = reserved_before, version_before
  for _, r in ipairs(held) do
    version = version + 1
    redis.call('XADD', K_LEDGER, '*', 'e', entry_prefix .. string.format(
      ',"reserved_before":%d,"reserved_after":%d,"version":%d,"reservation_id":"%s","qty":%d,"backordered":%d',
      reserved, reserved + r.qty, version, r.reservation_id, r.qty, r.backordered)
      .. json_id_field('cart_id', r.cart_id) .. '}')
    reserved = reserved + r.qty
  end
  notify(cell_id, c)
  return answers
end

-- Transfers ---------------------------------------------------------------

-- Debits up to `want` sellable units of cell `from_id` for transfer `t`
-- (`exact` refuses unless all of `want` can move). Records the transfer as
-- debited in this partition, with the ledger entry. Returns the units moved
-- and the transfer record (0 and no record: nothing moved, with why), or nil
-- and a refusal.
--
-- A pool lends nothing while a drain of its buckets is under way (the drain
-- counts what the buckets hold and must not see them grow), and a fenced
-- bucket gives units back only to a drain (`t.fence`). Each record carries the
-- pool's drain epoch at the debit: a bucket credited by a debit made after its
-- fence opens again (transfer_in).
-- A refusal when pool `c` lists node `node`'s bucket in a partition other
-- than `partition` (a bucket never moves while its pool lists it: its units
-- and holds would be left where nothing looks), else nil.
local function bucket_placement_refusal(c, node, partition)
  local recorded = type(c.buckets) == 'table' and c.buckets[node] or nil
  if recorded ~= nil and recorded ~= partition then
    return refuse('bad_argument', { reason = 'bucket_partition', node = node, partition = recorded })
  end
  return nil
end

local function transfer_debit(t, want, exact)
  local existing = redis.call('HGET', K_XFER, t.transfer_id)
  if existing then
    local rec = cjson.decode(existing)
    return rec.qty, nil, rec
  end
  expire_cell_due(t.from_cell)
  local c = cell_get(t.from_cell)
  if not c then return nil, refuse('not_found') end
  if c.kind == 'pool' and drain_live(c) then return 0, nil, nil, 'draining' end
  if c.kind == 'bucket' and c.fenced and not t.fence then return 0, nil, nil, 'fenced' end
  if c.kind == 'pool' and t.to_kind == 'bucket' then
    local refusal = bucket_placement_refusal(c, t.to_node, t.to_partition)
    if refusal then return nil, refusal end
  end
  local free = sellable(c)
  if free < 0 then free = 0 end
  local moved = want
  if moved > free then
    if exact then return nil, refuse('insufficient_stock', { requested = want, available = free }) end
    moved = free
  end
  if moved == 0 then return 0, nil, nil, 'empty' end
  local on_hand_before, reserved_before = c.on_hand, c.reserved
  c.on_hand = c.on_hand - moved
  -- Units debited here and not yet known credited: a hot reservation does not
  -- answer "sold out" while any are on their way to another cell.
  c.out_in_flight = (c.out_in_flight or 0) + moved
  c.version = c.version + 1
  if c.kind == 'pool' and t.to_kind == 'bucket' then
    -- The pool is the one home of the list of its key's buckets: drains,
    -- reads and the reconciler find them here, whatever the config says now.
    if type(c.buckets) ~= 'table' then c.buckets = {} end
    c.buckets[t.to_node] = t.to_partition
  end
  assert_cell(c, t.from_cell)
  cell_put(t.from_cell, c)
  local rec = {
    transfer_id = t.transfer_id, side = 'out', status = 'debited', qty = moved,
    from_cell = t.from_cell, to_cell = t.to_cell, to_partition = t.to_partition,
    merchant = c.merchant, sku = c.sku, location = c.location, to_kind = t.to_kind,
    to_node = t.to_node, reason = t.reason, debited_at_ms = NOW,
    epoch = (c.kind == 'pool') and (c.drain_epoch or 0) or nil,
  }
  redis.call('HSET', K_XFER, t.transfer_id, cjson.encode(rec))
  ledger('transfer_out', t.from_cell, on_hand_before, reserved_before, c, {
    qty = moved, transfer_id = t.transfer_id, to_cell = t.to_cell, reason = t.reason,
  })
  notify(t.from_cell, c)
  return moved, nil, rec
end

local function check_transfer(t)
  if type(t) ~= 'table' or not is_id(t.transfer_id) then return 'transfer_id' end
  if not is_cell_id(t.from_cell) or not is_cell_id(t.to_cell) then return 'cells' end
  if not is_int(t.to_partition, 0, LIMITS.partition_max) then return 'to_partition' end
  if t.to_kind ~= 'pool' and t.to_kind ~= 'bucket' then return 'to_kind' end
  if t.to_kind == 'bucket' and not is_id(t.to_node) then return 'to_node' end
  return nil
end
