#!/usr/bin/env python3
"""bench/cluster.md and cluster.json from the raw files of scripts/bench-cluster.

Usage: bench_cluster_report.py RAW OUT QUICK STEP_SECONDS CONNECTIONS CPUS

In a quick run it checks instead of measuring: every reservation answered
201, and on the three-master leg the sale's three buckets on three masters.
Exits 1 when a check fails.
"""

import datetime
import json
import os
import sys

from bench_report import command_version, read, wrk_nodes


def masters(nodes_path):
    """[(first slot, last slot, 'host:port')] of the masters in CLUSTER NODES."""
    ranges = []
    for line in read(nodes_path).splitlines():
        fields = line.split()
        if len(fields) < 8 or "master" not in fields[2]:
            continue
        address = fields[1].split("@")[0]
        for part in fields[8:]:
            if part.startswith("["):
                continue
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first), address))
    return ranges


def placement(raw, leg):
    """(node, partition, slot, master) of every bucket the sale's pool records."""
    pool = json.loads(read(os.path.join(raw, f"{leg}-pool.json"), "{}"))
    slots = {}
    for line in read(os.path.join(raw, f"{leg}-slots.txt")).splitlines():
        partition, slot = line.split()
        slots[int(partition)] = int(slot)
    owners = masters(os.path.join(raw, f"{leg}-nodes.txt"))

    def owner(slot):
        return next((address for first, last, address in owners if first <= slot <= last), "?")

    rows = []
    for node, partition in sorted(pool.get("buckets", {}).items()):
        slot = slots.get(int(partition), -1)
        rows.append({"node": node, "partition": int(partition), "slot": slot, "master": owner(slot)})
    return rows


def cpu(raw, leg):
    """Each master's and gateway's CPU, in cores, during the load (user + system)."""

    def ticks(path):
        values, clock = {}, None
        for line in read(path).splitlines():
            name, value = line.split()
            if name == "clock":
                clock = float(value)
            else:
                values[name] = int(value)
        return values, clock

    before, start = ticks(os.path.join(raw, f"{leg}-cpu-before.txt"))
    after, end = ticks(os.path.join(raw, f"{leg}-cpu-after.txt"))
    hertz = os.sysconf("SC_CLK_TCK")
    seconds = (end - start) if start and end else 0.0
    return {
        port: round((after.get(port, 0) - before[port]) / hertz / seconds, 2) if seconds else None
        for port in before
    }


def main():
    raw, out = sys.argv[1], sys.argv[2]
    quick = sys.argv[3] == "1"
    step_seconds, connections, cpus = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    legs = {}
    for leg in ("one", "three"):
        cores = cpu(raw, leg)
        reservations = wrk_nodes(raw, f"{leg}-wrk-*.txt")
        masters_cores = {name: share for name, share in cores.items() if not name.startswith("gateway")}
        busiest = max((share or 0.0 for share in masters_cores.values()), default=0.0)
        legs[leg] = {
            "reservations": reservations,
            "buckets": placement(raw, leg),
            "master_cpu_cores": masters_cores,
            "gateway_cpu_cores": round(sum(share or 0.0 for name, share in cores.items() if name.startswith("gateway")), 2),
            # The rate at which the busiest master would fill one core, all
            # else equal: where Redis, not this machine, stops the sale.
            "redis_bound_per_second": round(reservations["requests_per_second"] / busiest) if busiest else None,
            "redis_us_per_reservation": round(
                sum(share or 0.0 for share in masters_cores.values()) * 1e6 / reservations["requests_per_second"], 1
            ) if reservations["requests_per_second"] else None,
        }
    one = legs["one"]["reservations"]["requests_per_second"]
    three = legs["three"]["reservations"]["requests_per_second"]
    report = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "step_seconds": step_seconds,
        "connections_per_node": connections,
        "cpus": cpus,
        "redis": command_version("redis-server", "--version"),
        "legs": legs,
        "three_over_one": round(three / one, 3) if one else None,
    }
    bound_one, bound_three = (legs[leg]["redis_bound_per_second"] for leg in ("one", "three"))
    report["redis_bound_three_over_one"] = round(bound_three / bound_one, 3) if bound_one and bound_three else None
    failures = []
    for leg, data in legs.items():
        if data["reservations"]["non_2xx"]:
            failures.append(f"{leg}: {data['reservations']['non_2xx']} answers were not 201")
        if data["reservations"]["requests"] == 0:
            failures.append(f"{leg}: no reservation was answered")
        if len(data["buckets"]) != 3:
            failures.append(f"{leg}: the pool records {len(data['buckets'])} buckets, not 3")
    spread = {row["master"] for row in legs["three"]["buckets"]}
    if len(spread) != 3:
        failures.append(f"three: the buckets are on {len(spread)} masters: {sorted(spread)}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cluster.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")

    def rows(leg):
        return [
            f"| {leg} | {row['node']} | {row['partition']} | {row['slot']} | {row['master']} |"
            for row in legs[leg]["buckets"]
        ]

    def cores(leg):
        return ", ".join(f"{port}: {share}" for port, share in legs[leg]["master_cpu_cores"].items())

    def line(leg, label):
        data = legs[leg]["reservations"]
        return (
            f"| {label} | {data['requests_per_second']:,.1f} | {data['requests']:,} | {data['non_2xx']:,} "
            f"| {data['p99_ms_worst_node']:.2f} ms | {cores(leg)} | {legs[leg]['gateway_cpu_cores']} "
            f"| {legs[leg]['redis_us_per_reservation']} | {legs[leg]['redis_bound_per_second']:,} |"
        )

    lines = [
        "# A hot SKU on one Redis master and on three",
        "",
        f"Generated {report['generated_at']} by `scripts/bench-cluster{' --quick' if quick else ''}` on {cpus} CPUs "
        f"({report['redis']}). One flash sale over three gateway nodes (node-a, node-b, node-c), "
        f"`wrk -t1 -c{connections}` of one-unit reservations with unique Idempotency-Keys on every node at once "
        f"for {step_seconds} s, once with the cluster's 16384 slots on one master and once on three masters "
        "(both clusters this run's own, empty at the start); the same build, config and load in both legs, one run. No ledger writer runs (the outbox keeps "
        "what it appends), so the figure is the reservation path's. Load, gateways and Redis share the machine's cores.",
        "",
        "| leg | reservations/s (3 nodes) | requests | non-2xx | p99 (worst node) | master CPU (cores) "
        "| gateways' CPU (cores) | Redis CPU µs per reservation | Redis-bound reservations/s |",
        "|---|---|---|---|---|---|---|---|---|",
        line("one", "1 master"),
        line("three", "3 masters"),
        "",
        f"**3 masters / 1 master, measured: {report['three_over_one']}; Redis-bound: "
        f"{report['redis_bound_three_over_one']}.**",
        "",
        "*Redis-bound reservations/s* is the measured rate divided by the busiest master's CPU share: the rate "
        "at which that master would fill one core, the other masters and the gateways not being the limit "
        "(as on a fleet where they have machines of their own). On this machine the two cores are shared by the "
        "three gateways, the load generators and Redis, so the measured rate stops where the machine does; "
        "the Redis-bound rate says how far the masters themselves would go.",
        "",
        "Where the buckets are (the pool's record; hash slot of the partition's tag `{p}`; its master):",
        "",
        "| leg | node | partition | slot | master |",
        "|---|---|---|---|---|",
        *rows("one"),
        *rows("three"),
        "",
        "Each node's requests claim and hold in that node's bucket only (its partition, so its master), "
        "refills move units from the pool in chunks; the `i`-th of the sale's three nodes has its bucket in "
        "the `i`-th third of the slots, which `redis-cli --cluster create` gives to the `i`-th master.",
    ]
    if failures:
        lines += ["", "## Checks that failed", "", *[f"- {failure}" for failure in failures]]
    with open(os.path.join(out, "cluster.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
