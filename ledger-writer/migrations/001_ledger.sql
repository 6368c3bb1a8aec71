-- The ledger: every entry the stock scripts wrote, once (entry_id is unique),
-- never updated or deleted by the writer.
CREATE TABLE ledger (
    entry_id        text PRIMARY KEY,          -- "<partition>-<stream id>"
    partition       integer NOT NULL,
    stream_id       text NOT NULL,
    op              text NOT NULL,
    merchant        text NOT NULL,
    sku             text NOT NULL,
    location        text NOT NULL,
    cell            text NOT NULL,
    qty             bigint NOT NULL DEFAULT 0,
    on_hand_before  bigint NOT NULL,
    on_hand_after   bigint NOT NULL,
    reserved_before bigint NOT NULL,
    reserved_after  bigint NOT NULL,
    version         bigint NOT NULL,
    reservation_id  text,
    cart_id         text,
    transfer_id     text,
    idempotency_key text,
    source          text,
    source_event_id text,
    shortfall       boolean NOT NULL DEFAULT false,
    node            text NOT NULL,
    at              timestamptz NOT NULL,      -- Redis time of the change
    relayed_at      timestamptz NOT NULL DEFAULT now(),
    entry           jsonb NOT NULL             -- the entry as written, schema v1
);
CREATE INDEX ledger_key_at ON ledger (merchant, sku, location, at);
CREATE INDEX ledger_cell_version ON ledger (cell, version);
CREATE INDEX ledger_reservation ON ledger (reservation_id) WHERE reservation_id IS NOT NULL;

-- The latest state of every cell, moved only by a newer version.
CREATE TABLE stock_snapshot (
    cell       text PRIMARY KEY,
    merchant   text NOT NULL,
    sku        text NOT NULL,
    location   text NOT NULL,
    on_hand    bigint NOT NULL,
    reserved   bigint NOT NULL,
    version    bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX stock_snapshot_key ON stock_snapshot (merchant, sku, location);
