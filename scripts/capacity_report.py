#!/usr/bin/env python3
"""bench/capacity.md and capacity.json: the measured inputs of the capacity
model and the fleet arithmetic for the seeds' figures.

Usage: capacity_report.py OUT CLUSTER_JSON

OUT holds capacity-redis.json (the allocator's capacity bench) and
capacity-postgres.json (sizes read from the stack's database); CLUSTER_JSON
is scripts/bench-cluster's report (optional: the Redis CPU per reservation).
Every assumption of the arithmetic is a named constant below and is printed
in the report beside the figure it makes.
"""

import datetime
import json
import os
import sys

from bench_report import read

# The seeds' peak (seed 000, seed 003): the figures this fleet must carry.
SKUS = 12_000_000
WAREHOUSES = 40
RESERVATIONS_PER_SECOND = 200_000
STOCK_EVENTS_PER_SECOND = 150_000
HOLD_MINUTES = 10
RAW_LEDGER_DAYS = 180

# Assumptions (not measured here; change them and run the report again).
FILL = 0.25  # share of (SKU, warehouse) pairs with a stock cell
LOCATIONS_PER_STOCKED_SKU = FILL * WAREHOUSES
ENTRIES_PER_RESERVATION = 2  # its reserve, then its commit, release or expiry
ENTRIES_PER_STOCK_EVENT = 1  # one adjust
RECORD_RETENTION_HOURS = 24  # terminal reservations and idempotency records (lua/lib.lua RETENTION_MS)
OUTBOX_LAG_SECONDS = 1  # entries waiting in the streams for the writer
USABLE_GB_PER_MASTER = 24  # of a 32 GB machine, leaving room for forks and fragmentation
CPU_HEADROOM = 0.7  # a master run at 70% of a core at peak
KAFKA_RECORD_OVERHEAD = 20  # bytes per record in a batch (varints, attributes), before compression
GB = 1e9


def load(path):
    try:
        return json.loads(read(path, "{}"))
    except json.JSONDecodeError:
        return {}


def human(nbytes):
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes:,.0f} B"


def scaling_line(scaling):
    """What the catalogue-size table says, as ratios of the largest size to the smallest."""
    if len(scaling) < 2:
        return "- Catalogue size: one size measured only."
    first, last = scaling[0], scaling[-1]
    reserve = last["reservations_per_second"] / max(first["reservations_per_second"], 1)
    reads = last["reads_per_second"] / max(first["reads_per_second"], 1)
    return (
        f"- **Catalogue size**: from {first['keys']:,} to {last['keys']:,} keys, reservations ran at "
        f"{reserve:.2f} of their rate and uncached reads at {reads:.2f} (same run; this machine's run-to-run "
        "noise is around ±10%). Every lookup is a hash field or a sorted-set member of the key's partition, so "
        "nothing walks the catalogue; what grows is memory (the last column) and, with it, cache misses."
    )


def main():
    out, cluster_path = sys.argv[1], sys.argv[2]
    redis = load(os.path.join(out, "capacity-redis.json"))
    postgres = load(os.path.join(out, "capacity-postgres.json"))
    cluster = load(cluster_path)
    b = redis.get("bytes", {})
    three = cluster.get("legs", {}).get("three", {})
    redis_us = three.get("redis_us_per_reservation")

    pg_row = postgres.get("ledger_bytes", 0) / max(postgres.get("ledger_rows", 0), 1)
    snapshot_row = postgres.get("snapshot_bytes", 0) / max(postgres.get("snapshot_rows", 0), 1)
    kafka_message = float(postgres.get("kafka_value_bytes") or 0) + float(postgres.get("kafka_key_bytes") or 0) + KAFKA_RECORD_OVERHEAD

    cells = SKUS * WAREHOUSES * FILL
    stocked_skus = SKUS  # every SKU stocked somewhere
    index_per_sku = b.get("location_index_of_a_one_location_sku", 0) + (
        b.get("location_index_of_a_40_location_sku", 0) - b.get("location_index_of_a_one_location_sku", 0)
    ) * (LOCATIONS_PER_STOCKED_SKU - 1) / 39
    catalogue_bytes = cells * b.get("cell", 0) + stocked_skus * index_per_sku
    open_holds = RESERVATIONS_PER_SECOND * HOLD_MINUTES * 60
    hold_bytes = b.get("hold_record", 0) + b.get("hold_due_indexes", 0) + b.get("idempotency_record", 0)
    open_hold_bytes = open_holds * hold_bytes
    retained = RESERVATIONS_PER_SECOND * RECORD_RETENTION_HOURS * 3600
    retained_bytes = retained * (b.get("hold_record", 0) + b.get("idempotency_record", 0))
    entries_per_second = RESERVATIONS_PER_SECOND * ENTRIES_PER_RESERVATION + STOCK_EVENTS_PER_SECOND * ENTRIES_PER_STOCK_EVENT
    outbox_bytes = entries_per_second * OUTBOX_LAG_SECONDS * b.get("ledger_stream_entry", 0)
    redis_total = catalogue_bytes + open_hold_bytes + retained_bytes + outbox_bytes
    masters_memory = redis_total / (USABLE_GB_PER_MASTER * GB)
    # Redis CPU: every reservation as a hot-SKU one measured it (claim, hold,
    # refills, notifications); a stock event as one more script call of that cost.
    masters_cpu = None
    if redis_us:
        core_seconds = (RESERVATIONS_PER_SECOND + STOCK_EVENTS_PER_SECOND) * redis_us / 1e6
        masters_cpu = core_seconds / CPU_HEADROOM
    pg_per_day = entries_per_second * 86400 * pg_row
    kafka_per_day = entries_per_second * 86400 * kafka_message

    report = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "measured": {"redis": redis, "postgres": postgres, "redis_us_per_reservation": redis_us},
        "derived": {
            "postgres_bytes_per_ledger_row": round(pg_row),
            "postgres_bytes_per_snapshot_row": round(snapshot_row),
            "kafka_bytes_per_message": round(kafka_message),
            "redis_catalogue_bytes": catalogue_bytes,
            "redis_open_hold_bytes": open_hold_bytes,
            "redis_retained_record_bytes": retained_bytes,
            "redis_outbox_bytes": outbox_bytes,
            "redis_total_bytes": redis_total,
            "masters_for_memory": masters_memory,
            "masters_for_cpu": masters_cpu,
            "ledger_entries_per_second": entries_per_second,
            "postgres_bytes_per_day": pg_per_day,
            "postgres_bytes_raw_retention": pg_per_day * RAW_LEDGER_DAYS,
            "kafka_bytes_per_day": kafka_per_day,
        },
    }
    with open(os.path.join(out, "capacity.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")

    scaling = redis.get("scaling", [])
    rows = [
        f"| {row['keys']:,} | {row['reservations_per_second']:,.0f} | {row['reservation_p99_ms']:.2f} ms "
        f"| {row['reads_per_second']:,.0f} | {row['read_p99_ms']:.2f} ms | {human(row['used_memory_bytes'])} |"
        for row in scaling
    ]
    cpu_line = (
        f"| masters for CPU | ({RESERVATIONS_PER_SECOND:,} + {STOCK_EVENTS_PER_SECOND:,}) calls/s × {redis_us} µs "
        f"(a hot-SKU reservation's Redis CPU, `bench/cluster.md`) ÷ {CPU_HEADROOM} of a core each | **{masters_cpu:,.0f} masters** |"
        if masters_cpu
        else "| masters for CPU | run `scripts/bench-cluster` first: it measures the Redis CPU per reservation | |"
    )
    lines = [
        "# Capacity model",
        "",
        f"Generated {report['generated_at']} by `scripts/capacity`. Measured inputs first (this machine, one run), "
        "then the seeds' peak multiplied out. The assumptions are constants at the top of "
        "`scripts/capacity_report.py`; each is named beside the figure it makes.",
        "",
        "## Measured: Redis bytes (MEMORY USAGE, exact)",
        "",
        f"On a Redis of its own, {b.get('sample_keys', 0):,} stock keys, then one hold on each.",
        "",
        "| what | bytes |",
        "|---|---|",
        f"| a stock cell (its field in the partition's `cells` hash) | {b.get('cell', 0):,.0f} |",
        f"| a SKU's location index, one location / 40 locations | {b.get('location_index_of_a_one_location_sku', 0):,} / {b.get('location_index_of_a_40_location_sku', 0):,} |",
        f"| an open hold: its record | {b.get('hold_record', 0):,.0f} |",
        f"| an open hold: its two due indexes | {b.get('hold_due_indexes', 0):,.0f} |",
        f"| a reservation's idempotency record (its claim) | {b.get('idempotency_record', 0):,.0f} |",
        f"| a ledger stream entry (outbox) | {b.get('ledger_stream_entry', 0):,.0f} |",
        f"| all of Redis' memory per key with one hold (dict overhead, allocator slack included) | {b.get('used_memory_per_key_with_one_hold', 0):,.0f} |",
        "",
        "## Measured: PostgreSQL and Kafka",
        "",
        f"From the stack's database as it stands ({postgres.get('ledger_rows', 0):,} ledger rows).",
        "",
        "| what | bytes |",
        "|---|---|",
        f"| a ledger row (table, indexes and TOAST) | {pg_row:,.0f} |",
        f"| a snapshot row | {snapshot_row:,.0f} |",
        f"| a Kafka ledger message (value {float(postgres.get('kafka_value_bytes') or 0):,.0f} + key {float(postgres.get('kafka_key_bytes') or 0):,.0f} + ~{KAFKA_RECORD_OVERHEAD} record overhead, uncompressed) | {kafka_message:,.0f} |",
        "",
        "## Measured: does anything slow down as the catalogue grows?",
        "",
        f"One-unit reservations of random keys, then uncached reads (`stock_views`) of random keys, "
        f"{redis.get('concurrency', 0)} at a time for {redis.get('seconds', 0)} s each, on one Redis:",
        "",
        "| catalogue keys | reservations/s | p99 | uncached reads/s | p99 | Redis memory |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "## The seeds' peak, multiplied out",
        "",
        f"{SKUS:,} SKUs × {WAREHOUSES} warehouses, {FILL:.0%} of the pairs stocked (assumption: sparse), "
        f"{RESERVATIONS_PER_SECOND:,} reservations/s held {HOLD_MINUTES} minutes, {STOCK_EVENTS_PER_SECOND:,} stock events/s, "
        f"{RAW_LEDGER_DAYS} days of raw ledger.",
        "",
        "| what | arithmetic | figure |",
        "|---|---|---|",
        f"| stock cells | {SKUS:,} × {WAREHOUSES} × {FILL} | {cells:,.0f} |",
        f"| Redis: catalogue | cells × {b.get('cell', 0):,.0f} B + {SKUS:,} location indexes × {index_per_sku:,.0f} B | {human(catalogue_bytes)} |",
        f"| Redis: open holds at peak | {RESERVATIONS_PER_SECOND:,}/s × {HOLD_MINUTES * 60} s = {open_holds:,.0f} holds × {hold_bytes:,.0f} B | {human(open_hold_bytes)} |",
        f"| Redis: finished reservations and their idempotency records, kept {RECORD_RETENTION_HOURS} h | {retained:,.0f} × {b.get('hold_record', 0) + b.get('idempotency_record', 0):,.0f} B | **{human(retained_bytes)}** |",
        f"| Redis: the outbox, {OUTBOX_LAG_SECONDS} s behind | {entries_per_second:,.0f} entries/s × {b.get('ledger_stream_entry', 0):,.0f} B | {human(outbox_bytes)} |",
        f"| Redis in all | | {human(redis_total)} |",
        f"| masters for memory | ÷ {USABLE_GB_PER_MASTER} GB usable each | **{masters_memory:,.0f} masters** |",
        f"| masters for memory, finished records kept minutes instead | (catalogue + open holds + outbox) ÷ {USABLE_GB_PER_MASTER} GB | {(redis_total - retained_bytes) / (USABLE_GB_PER_MASTER * GB):,.0f} masters |",
        cpu_line,
        f"| ledger entries | {RESERVATIONS_PER_SECOND:,} × {ENTRIES_PER_RESERVATION} + {STOCK_EVENTS_PER_SECOND:,} × {ENTRIES_PER_STOCK_EVENT} | {entries_per_second:,.0f}/s |",
        f"| PostgreSQL ledger per day | entries/s × 86,400 × {pg_row:,.0f} B | {human(pg_per_day)} |",
        f"| PostgreSQL raw ledger, {RAW_LEDGER_DAYS} days | | {human(pg_per_day * RAW_LEDGER_DAYS)} |",
        f"| Kafka ledger per day, before compression and replication | entries/s × 86,400 × {kafka_message:,.0f} B | {human(kafka_per_day)} |",
        "",
        "What the arithmetic says:",
        "",
        f"- **Retention, not stock, sizes Redis at this peak.** Keeping every finished reservation and its "
        f"idempotency record {RECORD_RETENTION_HOURS} h costs {human(retained_bytes)}, against "
        f"{human(catalogue_bytes)} for the catalogue and {human(open_hold_bytes)} for the open holds. "
        "The retention is a constant of the scripts today; at this rate it must be shorter and configured "
        "(an idempotency key needs to outlive a client's retries, minutes, not a day) or move out of Redis.",
        "- **The raw ledger cannot stay in PostgreSQL for 180 days** at JSON rows of this size: it belongs in "
        "the archive (compressed columnar files, the ledger archive issue), with PostgreSQL keeping a short "
        "window and the curated history. A compact entry (fixed fields, no repeated names) would shrink "
        "every store's share several times over.",
        scaling_line(scaling),
    ]
    with open(os.path.join(out, "capacity.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
