-- The ledger, partitioned by day (UTC) of the change's Redis time, so that
-- retention drops whole days once they are archived (archive.rs,
-- retention.rs). An entry's `at` comes from the entry itself, so a replayed
-- entry lands in the same day and the primary key (entry_id, at) still
-- admits each entry once.

ALTER TABLE ledger RENAME TO ledger_unpartitioned;
ALTER INDEX ledger_pkey RENAME TO ledger_unpartitioned_pkey;
ALTER INDEX ledger_key_at RENAME TO ledger_unpartitioned_key_at;
ALTER INDEX ledger_cell_version RENAME TO ledger_unpartitioned_cell_version;
ALTER INDEX ledger_reservation RENAME TO ledger_unpartitioned_reservation;

CREATE TABLE ledger (
    entry_id        text NOT NULL,             -- "<partition>-<stream id>"
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
    entry           jsonb NOT NULL,            -- the entry as written, schema v1
    PRIMARY KEY (entry_id, at)
) PARTITION BY RANGE (at);
CREATE INDEX ledger_key_at ON ledger (merchant, sku, location, at);
CREATE INDEX ledger_cell_version ON ledger (cell, version);
CREATE INDEX ledger_reservation ON ledger (reservation_id) WHERE reservation_id IS NOT NULL;

-- The partition of one day, created if missing; returns its name
-- (`ledger_YYYYMMDD`). The one home of partition naming and bounds. Writers
-- creating the same day at once take turns on an advisory lock; the one
-- that comes second may still not see the first one's table (taking an
-- advisory lock does not refresh the catalog cache), so it is told by the
-- error that the table exists.
CREATE FUNCTION ledger_day_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'ledger_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(name) IS NULL THEN
        PERFORM pg_advisory_xact_lock(1961448);
        BEGIN
            EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
                           name,
                           day::timestamp AT TIME ZONE 'UTC',
                           (day + 1)::timestamp AT TIME ZONE 'UTC');
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL;
        END;
    END IF;
    RETURN name;
END $$;

-- The day partitions there are, oldest first.
CREATE VIEW ledger_days AS
SELECT to_date(substr(c.relname, 8), 'YYYYMMDD') AS day, c.relname::text AS partition_table
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'ledger'::regclass AND c.relname ~ '^ledger_[0-9]{8}$'
ORDER BY 1;

SELECT ledger_day_partition(d)
FROM (SELECT DISTINCT (at AT TIME ZONE 'UTC')::date AS d FROM ledger_unpartitioned) AS days;
INSERT INTO ledger SELECT * FROM ledger_unpartitioned;
-- Its views go with it; views.sql creates them again over the new table.
DROP TABLE ledger_unpartitioned CASCADE;

-- What the dropped days of the ledger leave behind, so that the audit and
-- the rebuild still start each cell from where its dropped entries left it
-- (an accountant's balance carried forward). One row per cell per dropped
-- day, written in the transaction that drops the day's partition, deleted in
-- the one that replays the day back: a day is either in `ledger` or here,
-- never both (retention.rs).
CREATE TABLE ledger_carried (
    day             date NOT NULL,
    partition       integer NOT NULL,
    cell            text NOT NULL,
    merchant        text NOT NULL,
    sku             text NOT NULL,
    location        text NOT NULL,
    entries         bigint NOT NULL,
    first_entry_id  text NOT NULL,             -- the cell's first and last entry that day
    last_entry_id   text NOT NULL,
    on_hand_before  bigint NOT NULL,           -- before the first
    reserved_before bigint NOT NULL,
    on_hand_after   bigint NOT NULL,           -- after the last
    reserved_after  bigint NOT NULL,
    version         bigint NOT NULL,
    adjusted        bigint NOT NULL,           -- Σ adjust qty
    committed       bigint NOT NULL,           -- Σ commit qty
    sent            bigint NOT NULL,           -- Σ transfer_out qty
    received        bigint NOT NULL,           -- Σ transfer_in qty
    PRIMARY KEY (day, partition, cell)
);

-- Entries of a dropped day the audit still reads whole: transfer halves
-- whose other half was not in that day (it matches transfers by id) and
-- settings (what a key's safety stock and backorder limit were).
CREATE TABLE ledger_carried_entries (
    day      date NOT NULL,
    entry_id text NOT NULL,
    entry    jsonb NOT NULL,
    PRIMARY KEY (day, entry_id)
);

-- The curated daily history kept after the raw ledger's days are dropped
-- (history.rs): per stock key per day (UTC), the on-hand units at the day's
-- first entry and after its last, the flows between, and the minutes its
-- pool had nothing sellable.
CREATE TABLE stock_history_daily (
    merchant         text NOT NULL,
    sku              text NOT NULL,
    location         text NOT NULL,
    day              date NOT NULL,
    opening_on_hand  bigint NOT NULL,
    received         bigint NOT NULL,
    removed          bigint NOT NULL,
    sold             bigint NOT NULL,
    moved_in         bigint NOT NULL,
    moved_out        bigint NOT NULL,
    rebuilt          bigint NOT NULL,
    closing_on_hand  bigint NOT NULL,
    stockout_minutes numeric(8, 2) NOT NULL,
    entries          bigint NOT NULL,
    built_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (merchant, sku, location, day)
);
CREATE INDEX stock_history_daily_day ON stock_history_daily (day);
