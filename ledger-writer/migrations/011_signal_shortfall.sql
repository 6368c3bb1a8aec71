-- Shortfall signals: a stock key whose shelf holds fewer units than it has
-- promised or sold past its backorder limit (a loss, or an offline POS's
-- backlog of sales arriving late) is signalled `shortfall` once per
-- crossing (ledger-writer's `signals` module).
--
-- backorder_limit: from the key's last settings entry still in the ledger
-- (0 when none is). short: whether the key was short when last seen; NULL
-- until a relay transaction sees it after this migration, which then takes
-- it from the cells before its entries and emits nothing for it (a key
-- already short at the upgrade is not signalled for being so).
ALTER TABLE signal_state
    ADD COLUMN backorder_limit bigint NOT NULL DEFAULT 0,
    ADD COLUMN short boolean;

UPDATE signal_state s
SET backorder_limit = latest.backorder_limit
FROM (
    SELECT DISTINCT ON (merchant, sku, location) merchant, sku, location,
           COALESCE((entry->>'backorder_limit')::bigint, 0) AS backorder_limit
    FROM ledger
    WHERE op = 'settings'
    ORDER BY merchant, sku, location, at DESC, entry_id DESC
) latest
WHERE s.merchant = latest.merchant AND s.sku = latest.sku AND s.location = latest.location;
