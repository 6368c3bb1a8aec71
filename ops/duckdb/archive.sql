-- The ledger archive's Parquet files as DuckDB views: the analyst's side of
-- PostgreSQL's views (ledger-writer/migrations/views.sql), for days that
-- may no longer be in PostgreSQL. Set the archive's root first:
--
--   SET VARIABLE archive = '/path/to/archive';   -- or 's3://bucket/prefix' (httpfs)
--   .read ops/duckdb/archive.sql
--
-- Times are UTC: `day` is the partition's day, `"at"` the entry's Redis time
-- (quoted: AT is a keyword in DuckDB).
-- stock_reconciliation_daily and reservation_funnel_hourly give exactly what
-- their PostgreSQL namesakes give over the same entries
-- (ledger-writer/tests/archive.rs holds them equal).

CREATE OR REPLACE VIEW ledger AS
SELECT *, epoch_ms(at_ms::BIGINT) AS "at"
FROM read_parquet(getvariable('archive') || '/ledger/v1/*/*/*.parquet', hive_partitioning = true);

-- Per stock key per day: on-hand units at the day's first entry of each cell
-- that moved and after its last, the flows between, and `unexplained` (0
-- unless entries are missing from a cell's chain).
CREATE OR REPLACE VIEW stock_reconciliation_daily AS
WITH cell_days AS (
    SELECT merchant, sku, location, cell, day,
           first(on_hand_before ORDER BY version, entry_id)           AS opening,
           first(on_hand_after ORDER BY version DESC, entry_id DESC)  AS closing,
           coalesce(sum(qty) FILTER (WHERE op = 'adjust' AND qty > 0), 0)  AS received,
           coalesce(-sum(qty) FILTER (WHERE op = 'adjust' AND qty < 0), 0) AS removed,
           coalesce(sum(qty) FILTER (WHERE op = 'commit'), 0)              AS sold,
           coalesce(sum(qty) FILTER (WHERE op = 'transfer_in'), 0)         AS moved_in,
           coalesce(sum(qty) FILTER (WHERE op = 'transfer_out'), 0)        AS moved_out,
           coalesce(sum(on_hand_after - on_hand_before) FILTER (WHERE op = 'rebuild'), 0) AS rebuilt,
           count(*) AS entries
    FROM ledger
    GROUP BY merchant, sku, location, cell, day
)
SELECT merchant, sku, location, day,
       sum(opening)::BIGINT   AS opening_on_hand,
       sum(received)::BIGINT  AS received,
       sum(removed)::BIGINT   AS removed,
       sum(sold)::BIGINT      AS sold,
       sum(moved_in)::BIGINT  AS moved_in,
       sum(moved_out)::BIGINT AS moved_out,
       sum(rebuilt)::BIGINT   AS rebuilt,
       sum(closing)::BIGINT   AS closing_on_hand,
       (sum(closing) - sum(opening)
        - (sum(received) - sum(removed) - sum(sold)
           + sum(moved_in) - sum(moved_out) + sum(rebuilt)))::BIGINT AS unexplained,
       count(*)::BIGINT       AS cells,
       sum(entries)::BIGINT   AS entries
FROM cell_days
GROUP BY merchant, sku, location, day;

-- Every reservation by the hour it was held, and what became of it.
CREATE OR REPLACE VIEW reservation_funnel_hourly AS
WITH holds AS (
    SELECT reservation_id, merchant, sku, location,
           min("at") FILTER (WHERE op = 'reserve') AS held_at,
           sum(qty) FILTER (WHERE op = 'reserve') AS units,
           bool_or(op = 'commit')  AS committed,
           bool_or(op = 'release') AS released,
           bool_or(op = 'expire')  AS expired
    FROM ledger
    WHERE reservation_id IS NOT NULL
    GROUP BY reservation_id, merchant, sku, location
)
SELECT merchant, sku, location,
       date_trunc('hour', held_at)                                     AS hour,
       count(*)::BIGINT                                                AS held,
       sum(units)::BIGINT                                              AS units_held,
       count(*) FILTER (WHERE committed)::BIGINT                       AS committed,
       count(*) FILTER (WHERE released)::BIGINT                        AS released,
       count(*) FILTER (WHERE expired)::BIGINT                         AS expired,
       count(*) FILTER (WHERE NOT (committed OR released OR expired))::BIGINT AS still_held
FROM holds
WHERE held_at IS NOT NULL
GROUP BY merchant, sku, location, date_trunc('hour', held_at);

-- Stockout episodes of each pool cell: from the first entry that left it with
-- nothing sellable to the next that made it sellable (ended_at NULL: still
-- out at the archive's last entry).
CREATE OR REPLACE VIEW stockouts AS
WITH pool AS (
    SELECT merchant, sku, location, cell, "at", version, entry_id,
           (on_hand_after - reserved_after) <= 0 AS out_after
    FROM ledger
    WHERE cell LIKE '%|pool'
), flagged AS (
    SELECT *, out_after AND NOT coalesce(lag(out_after) OVER (PARTITION BY cell ORDER BY version, "at", entry_id), false) AS starts
    FROM pool
), numbered AS (
    SELECT *, sum(CASE WHEN starts THEN 1 ELSE 0 END)
                  OVER (PARTITION BY cell ORDER BY version, "at", entry_id ROWS UNBOUNDED PRECEDING) AS episode
    FROM flagged
)
SELECT merchant, sku, location, episode,
       min("at") FILTER (WHERE out_after)     AS started_at,
       min("at") FILTER (WHERE NOT out_after) AS ended_at
FROM numbered
WHERE episode > 0
GROUP BY merchant, sku, location, cell, episode
HAVING min("at") FILTER (WHERE out_after) IS NOT NULL;

-- A flash sale's postmortem per bucket node: what each node sold from its
-- bucket, was given (activation, refills) and gave back (reclaims, drains).
-- Refusals write no ledger entry: they are the gateways' counters
-- (invgw_sale_reservations_total{outcome="insufficient"} and
-- invgw_sale_refused_with_units_left_total, per node, in Prometheus).
CREATE OR REPLACE VIEW flash_sale_postmortem AS
SELECT merchant, sku, location,
       split_part(cell, '|', 5) AS node,
       sum(qty) FILTER (WHERE op = 'commit')                                     AS sold,
       sum(qty) FILTER (WHERE op = 'reserve')                                    AS reserved,
       sum(qty) FILTER (WHERE op = 'transfer_in' AND reason = 'activate')        AS presplit,
       sum(qty) FILTER (WHERE op = 'transfer_in' AND reason = 'refill')          AS refilled,
       count(*) FILTER (WHERE op = 'transfer_in' AND reason = 'refill')          AS refills,
       sum(qty) FILTER (WHERE op = 'transfer_out' AND reason IN ('reclaim', 'drain')) AS reclaimed,
       min("at") AS first_entry_at,
       max("at") AS last_entry_at
FROM ledger
WHERE cell LIKE '%|bucket|%'
GROUP BY merchant, sku, location, split_part(cell, '|', 5);
