-- Stock signals (`inventory.signals`), derived by the relay from the entries
-- it inserts, in the same transaction (ledger-writer's `signals` module).
--
-- signal_state: per stock key, what the signals last said and what the
-- ledger says of the key's settings and transfers under way. Its row is
-- locked (FOR UPDATE) by every relay transaction with new entries of the
-- key, so writers relaying the key's cells from different partitions
-- decide its crossings one after another.
CREATE TABLE signal_state (
    merchant            text NOT NULL,
    sku                 text NOT NULL,
    location            text NOT NULL,
    -- in_stock, low or out_of_stock; NULL until the first entry is seen.
    status              text,
    -- available was at or under reorder_point when last seen.
    below_reorder       boolean NOT NULL DEFAULT false,
    safety_stock        bigint NOT NULL DEFAULT 0,
    -- -1: the configured default.
    low_stock_threshold bigint NOT NULL DEFAULT -1,
    -- -1: none.
    reorder_point       bigint NOT NULL DEFAULT -1,
    reorder_qty         bigint NOT NULL DEFAULT 0,
    -- Units debited by transfer_out entries seen less those credited by
    -- transfer_in entries seen (either half may be relayed first).
    in_flight           bigint NOT NULL DEFAULT 0,
    last_entry_id       text,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant, sku, location)
);

-- Settings of keys the ledger already has, from their last settings entry
-- still in the ledger (a key whose settings entry retention dropped starts
-- from the defaults). Status and transfers start afresh: the first entry
-- relayed after the upgrade sets the status from the cells' values before
-- it, and emits nothing for it.
INSERT INTO signal_state (merchant, sku, location, safety_stock, low_stock_threshold)
SELECT DISTINCT ON (merchant, sku, location) merchant, sku, location,
       COALESCE((entry->>'safety_stock')::bigint, 0),
       COALESCE((entry->>'low_stock_threshold')::bigint, -1)
FROM ledger
WHERE op = 'settings'
ORDER BY merchant, sku, location, at DESC, entry_id DESC;

-- The signals, in the order they were decided; the publisher sends those
-- not yet published to Kafka (and marks them), in id order.
CREATE TABLE signals (
    id           bigserial PRIMARY KEY,
    -- `<entry_id>:<kind>`: the entry that caused it and what it says.
    signal_id    text NOT NULL UNIQUE,
    kind         text NOT NULL,
    merchant     text NOT NULL,
    sku          text NOT NULL,
    location     text NOT NULL,
    entry_id     text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX signals_unpublished ON signals (id) WHERE published_at IS NULL;
CREATE INDEX signals_key ON signals (merchant, sku, location, id);
