-- Shortfall signals: a stock key whose shelf holds fewer units than it has
-- promised or sold past its backorder limit (a loss, or an offline POS's
-- backlog of sales arriving late) is signalled `shortfall` once per
-- crossing (ledger-writer's `signals` module).
--
-- backorder_limit: from the key's last settings entry, in the ledger or
-- carried from a day retention dropped (0 when it has none). short:
-- whether the key was short when last seen; NULL until a relay transaction
-- sees it after this migration, which then takes it from the cells before
-- its entries and emits nothing for it (a key already short at the upgrade
-- is not signalled for being so).
--
-- The backfill is read before the ALTER takes signal_state's lock, so the
-- relays of writers still running wait only for the ALTER and the UPDATE
-- of signal_state's own rows. Run it with every writer upgraded together:
-- a writer of the release before does not keep the new columns.
CREATE TEMP TABLE backorder_limits ON COMMIT DROP AS
SELECT DISTINCT ON (merchant, sku, location) merchant, sku, location, backorder_limit
FROM (
    SELECT merchant, sku, location, (entry->>'at_ms')::bigint AS at_ms, entry_id,
           COALESCE((entry->>'backorder_limit')::bigint, 0) AS backorder_limit
    FROM ledger
    WHERE op = 'settings'
    UNION ALL
    SELECT entry->>'merchant', entry->>'sku', entry->>'location', (entry->>'at_ms')::bigint,
           entry_id, COALESCE((entry->>'backorder_limit')::bigint, 0)
    FROM ledger_carried_entries
    WHERE entry->>'op' = 'settings'
) settings
ORDER BY merchant, sku, location, at_ms DESC, entry_id DESC;

ALTER TABLE signal_state
    ADD COLUMN backorder_limit bigint NOT NULL DEFAULT 0,
    ADD COLUMN short boolean;

UPDATE signal_state s
SET backorder_limit = b.backorder_limit
FROM backorder_limits b
WHERE s.merchant = b.merchant AND s.sku = b.sku AND s.location = b.location
  AND b.backorder_limit <> 0;
