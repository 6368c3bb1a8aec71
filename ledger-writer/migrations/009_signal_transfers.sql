-- Stock signals count a transfer's units as in flight between its debit and
-- its credit. One counter per key drifted for good when one half was
-- relayed before signals existed (an upgrade during a flash sale) or never
-- was (a failover that lost a stream's tail): each transfer is now kept on
-- its own until both halves are seen, and an unmatched half counts only
-- while its credit may still come (ledger-writer's `signals` module).
CREATE TABLE signal_transfers (
    transfer_id text PRIMARY KEY,
    merchant    text NOT NULL,
    sku         text NOT NULL,
    location    text NOT NULL,
    -- + units debited and not yet seen credited; - credited, debit unseen.
    qty         bigint NOT NULL,
    at          timestamptz NOT NULL
);
CREATE INDEX signal_transfers_key ON signal_transfers (merchant, sku, location, at);

ALTER TABLE signal_state DROP COLUMN in_flight;

-- The halves of the last 12 hours (a credit comes within that, or never)
-- whose partner the ledger does not have yet.
INSERT INTO signal_transfers (transfer_id, merchant, sku, location, qty, at)
SELECT transfer_id, min(merchant), min(sku), min(location),
       sum(CASE op WHEN 'transfer_out' THEN qty ELSE -qty END), max(at)
FROM ledger
WHERE op IN ('transfer_out', 'transfer_in') AND at > now() - interval '12 hours'
  AND transfer_id IS NOT NULL
GROUP BY transfer_id
HAVING sum(CASE op WHEN 'transfer_out' THEN qty ELSE -qty END) <> 0;

-- Settings of keys whose last settings entry is in a day retention dropped
-- (kept in ledger_carried_entries) and that 007 could not see.
INSERT INTO signal_state (merchant, sku, location, safety_stock, low_stock_threshold)
SELECT DISTINCT ON (entry->>'merchant', entry->>'sku', entry->>'location')
       entry->>'merchant', entry->>'sku', entry->>'location',
       COALESCE((entry->>'safety_stock')::bigint, 0),
       COALESCE((entry->>'low_stock_threshold')::bigint, -1)
FROM ledger_carried_entries
WHERE entry->>'op' = 'settings'
ORDER BY entry->>'merchant', entry->>'sku', entry->>'location', (entry->>'at_ms')::bigint DESC
ON CONFLICT DO NOTHING;
