-- Analytics over the ledger: views, so they are always as fresh as the ledger.
-- Applied whole (dropped and created again) after every migration run that
-- changed the schema or when this file changed: it is the one home of the
-- views' definitions (migrations 002 and 004 first created them).

DROP VIEW IF EXISTS stock_movements_daily, stockouts, flash_sale_postmortem,
    stock_reconciliation_daily, reservation_funnel_hourly CASCADE;


-- Units moved per stock key per day, by kind of movement.
CREATE VIEW stock_movements_daily AS
SELECT merchant, sku, location,
       date_trunc('day', at) AS day,
       SUM(qty) FILTER (WHERE op = 'adjust' AND qty > 0)  AS received,
       -SUM(qty) FILTER (WHERE op = 'adjust' AND qty < 0) AS lost_or_removed,
       SUM(qty) FILTER (WHERE op = 'reserve')             AS reserved,
       SUM(qty) FILTER (WHERE op = 'commit')              AS sold,
       SUM(qty) FILTER (WHERE op = 'release')             AS released,
       SUM(qty) FILTER (WHERE op = 'expire')              AS expired,
       COUNT(*) FILTER (WHERE shortfall)                  AS shortfalls,
       COUNT(*)                                           AS entries
FROM ledger
GROUP BY merchant, sku, location, date_trunc('day', at);

-- Stockout episodes of each pool cell: from the first entry that left it with
-- nothing sellable (on_hand - reserved <= 0) to the next entry that made it
-- sellable again (ended_at NULL: still out of stock).
CREATE VIEW stockouts AS
WITH pool AS (
    SELECT merchant, sku, location, cell, at, version,
           (on_hand_after - reserved_after) <= 0 AS out_after
    FROM ledger
    WHERE cell LIKE '%|pool'
), flagged AS (
    SELECT *, out_after AND NOT COALESCE(LAG(out_after) OVER (PARTITION BY cell ORDER BY version, at), false) AS starts
    FROM pool
), numbered AS (
    SELECT *, SUM(CASE WHEN starts THEN 1 ELSE 0 END)
                  OVER (PARTITION BY cell ORDER BY version, at ROWS UNBOUNDED PRECEDING) AS episode
    FROM flagged
), episodes AS (
    SELECT merchant, sku, location, cell, episode,
           MIN(at) FILTER (WHERE out_after) AS started_at,
           MIN(at) FILTER (WHERE NOT out_after) AS ended_at
    FROM numbered
    WHERE episode > 0
    GROUP BY merchant, sku, location, cell, episode
)
SELECT merchant, sku, location, started_at, ended_at,
       COALESCE(ended_at, now()) - started_at AS duration
FROM episodes
WHERE started_at IS NOT NULL;

-- Flash-sale postmortem per stock key and bucket node, from the ledger: what
-- each node sold from its bucket, what it was given (activation, refills) and
-- what was taken back (reclaims, which are drains since the drain protocol,
-- and drains for a count). Refusals are not ledger entries: the
-- gateway's metrics and the economics test report those.
CREATE VIEW flash_sale_postmortem AS
SELECT merchant, sku, location,
       split_part(cell, '|', 5) AS node,
       SUM(qty) FILTER (WHERE op = 'commit')                                     AS sold,
       SUM(qty) FILTER (WHERE op = 'reserve')                                    AS reserved,
       SUM(qty) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'activate') AS presplit,
       SUM(qty) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'refill')   AS refilled,
       COUNT(*) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'refill')   AS refills,
       SUM(qty) FILTER (WHERE op = 'transfer_out'
                          AND entry->>'reason' IN ('reclaim', 'drain'))          AS reclaimed,
       MIN(at) AS first_entry_at,
       MAX(at) AS last_entry_at
FROM ledger
WHERE cell LIKE '%|bucket|%'
GROUP BY merchant, sku, location, split_part(cell, '|', 5);


-- Per stock key per day (UTC), over the key's cells that moved that day
-- (pool and flash-sale buckets; a cell with no entry that day is in neither
-- figure): the on-hand units at the day's first entry and after its last,
-- and the flows between them. Every entry's on-hand change is one of these
-- flows (adjust: its signed qty; commit: -qty; transfer halves: -/+qty;
-- rebuild: what it set), so `unexplained` is 0 unless entries are missing
-- from a cell's chain or one moved units its op and qty do not say. Units
-- moved between the key's own cells appear in both transfer columns (a
-- transfer credited the next day appears on each day once).
CREATE VIEW stock_reconciliation_daily AS
WITH cell_days AS (
    SELECT merchant, sku, location, cell,
           date_trunc('day', at) AS day,
           (array_agg(on_hand_before ORDER BY version, entry_id))[1]           AS opening,
           (array_agg(on_hand_after ORDER BY version DESC, entry_id DESC))[1]  AS closing,
           COALESCE(SUM(qty) FILTER (WHERE op = 'adjust' AND qty > 0), 0)      AS received,
           COALESCE(-SUM(qty) FILTER (WHERE op = 'adjust' AND qty < 0), 0)     AS removed,
           COALESCE(SUM(qty) FILTER (WHERE op = 'commit'), 0)                  AS sold,
           COALESCE(SUM(qty) FILTER (WHERE op = 'transfer_in'), 0)             AS moved_in,
           COALESCE(SUM(qty) FILTER (WHERE op = 'transfer_out'), 0)            AS moved_out,
           COALESCE(SUM(on_hand_after - on_hand_before)
                    FILTER (WHERE op = 'rebuild'), 0)                          AS rebuilt,
           COUNT(*)                                                            AS entries
    FROM ledger
    GROUP BY merchant, sku, location, cell, date_trunc('day', at)
)
SELECT merchant, sku, location, day,
       SUM(opening)::bigint   AS opening_on_hand,
       SUM(received)::bigint  AS received,
       SUM(removed)::bigint   AS removed,
       SUM(sold)::bigint      AS sold,
       SUM(moved_in)::bigint  AS moved_in,
       SUM(moved_out)::bigint AS moved_out,
       SUM(rebuilt)::bigint   AS rebuilt,
       SUM(closing)::bigint   AS closing_on_hand,
       (SUM(closing) - SUM(opening)
        - (SUM(received) - SUM(removed) - SUM(sold)
           + SUM(moved_in) - SUM(moved_out) + SUM(rebuilt)))::bigint AS unexplained,
       COUNT(*)::bigint       AS cells,
       SUM(entries)::bigint   AS entries
FROM cell_days
GROUP BY merchant, sku, location, day;

-- Every reservation by the hour (UTC) it was held, and what became of it:
-- committed, released, expired, or still held (no end in the ledger yet).
-- A cart counts once per line (each line is a reservation of its own key).
CREATE VIEW reservation_funnel_hourly AS
WITH holds AS (
    SELECT reservation_id, merchant, sku, location,
           MIN(at) FILTER (WHERE op = 'reserve') AS held_at,
           SUM(qty) FILTER (WHERE op = 'reserve') AS units,
           bool_or(op = 'commit')  AS committed,
           bool_or(op = 'release') AS released,
           bool_or(op = 'expire')  AS expired
    FROM ledger
    WHERE reservation_id IS NOT NULL
    GROUP BY reservation_id, merchant, sku, location
)
SELECT merchant, sku, location,
       date_trunc('hour', held_at)                                       AS hour,
       COUNT(*)::bigint                                                  AS held,
       SUM(units)::bigint                                                AS units_held,
       COUNT(*) FILTER (WHERE committed)::bigint                         AS committed,
       COUNT(*) FILTER (WHERE released)::bigint                          AS released,
       COUNT(*) FILTER (WHERE expired)::bigint                           AS expired,
       COUNT(*) FILTER (WHERE NOT (committed OR released OR expired))::bigint AS still_held
FROM holds
WHERE held_at IS NOT NULL
GROUP BY merchant, sku, location, date_trunc('hour', held_at);
