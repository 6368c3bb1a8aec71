-- drain: the pool's side of taking a key's buckets back (to count the key, to
-- apply a loss or a setting that would leave the pool short, to reclaim a
-- bucket). ARGS.cell is the pool cell.
--   begin  takes the key's drain lease for ARGS.lease_ms: a new drain epoch;
--          while it lasts the pool lends nothing (refills and activations
--          move no units), so what the buckets hold can only shrink. Refused
--          with busy {until_ms} while another drain holds it.
--   end    gives the lease of ARGS.epoch up (nothing if it is not current).
-- Replies: ok {epoch, until_ms, buckets {node: partition}, out_in_flight},
-- busy, not_found, bad_argument. No units move here.
local a = ARGS
if not is_cell_id(a.cell) then return refuse('bad_argument', { reason = 'cell' }) end
local c = cell_get(a.cell)
if not c then return refuse('not_found') end
if c.kind ~= 'pool' then return refuse('bad_argument', { reason = 'drains start at a pool' }) end
if a.action == 'begin' then
  if not is_int(a.lease_ms, 1, 60000) then return refuse('bad_argument', { reason = 'lease_ms' }) end
  if drain_live(c) then return refuse('busy', { until_ms = c.drain_until_ms }) end
  c.drain_epoch = (c.drain_epoch or 0) + 1
  c.drain_until_ms = NOW + a.lease_ms
  cell_put(a.cell, c)
  return reply({ status = 'ok', epoch = c.drain_epoch, until_ms = c.drain_until_ms,
    buckets = c.buckets or {}, out_in_flight = c.out_in_flight or 0 })
elseif a.action == 'end' then
  if not is_int(a.epoch, 1, 99999999999999) then return refuse('bad_argument', { reason = 'epoch' }) end
  if c.drain_epoch == a.epoch and drain_live(c) then
    c.drain_until_ms = 0
    cell_put(a.cell, c)
  end
  return reply({ status = 'ok', epoch = c.drain_epoch or 0, until_ms = c.drain_until_ms or 0,
    buckets = c.buckets or {}, out_in_flight = c.out_in_flight or 0 })
end
return refuse('bad_argument', { reason = 'action' })
