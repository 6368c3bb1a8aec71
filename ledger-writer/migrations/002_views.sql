-- Analytics over the ledger. Views, so they are always as fresh as the ledger.

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
-- what was taken back (reclaims). Refusals are not ledger entries: the
-- gateway's metrics and the economics test report those.
CREATE VIEW flash_sale_postmortem AS
SELECT merchant, sku, location,
       split_part(cell, '|', 5) AS node,
       SUM(qty) FILTER (WHERE op = 'commit')                                     AS sold,
       SUM(qty) FILTER (WHERE op = 'reserve')                                    AS reserved,
       SUM(qty) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'activate') AS presplit,
       SUM(qty) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'refill')   AS refilled,
       COUNT(*) FILTER (WHERE op = 'transfer_in' AND entry->>'reason' = 'refill')   AS refills,
       SUM(qty) FILTER (WHERE op = 'transfer_out' AND entry->>'reason' = 'reclaim') AS reclaimed,
       MIN(at) AS first_entry_at,
       MAX(at) AS last_entry_at
FROM ledger
WHERE cell LIKE '%|bucket|%'
GROUP BY merchant, sku, location, split_part(cell, '|', 5);
