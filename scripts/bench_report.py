#!/usr/bin/env python3
"""Turns the raw output of scripts/bench into report.json, report.md and SVG plots.

    scripts/bench_report.py RAW_DIR OUT_DIR QUICK PROFILE

Reads what scripts/bench left in RAW_DIR (wrk, redis-benchmark and k6 output,
the goose scenarios' summaries, writer lag samples, the audit) and writes
OUT_DIR/report.json, OUT_DIR/report.md, OUT_DIR/latency.svg and
OUT_DIR/scenarios.svg. Standard library only.
"""

import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys


def read(path, default=""):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return default


def command_version(*argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.SubprocessError):
        return "not found"


def wrk(path):
    """requests/s, latency percentiles (ms) and non-2xx count of one wrk run."""
    text = read(path)
    result = {"requests_per_second": 0.0, "non_2xx": 0}
    match = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if match:
        result["requests_per_second"] = float(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if match:
        result["non_2xx"] = int(match.group(1))
    match = re.search(r"^\s+(\d+) requests in", text, re.M)
    result["requests"] = int(match.group(1)) if match else 0
    for percent, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        result[f"p{percent}_ms"] = round(float(value) * scale, 3)
    match = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", text, re.M)
    if match:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        result["max_ms"] = round(float(match.group(1)) * scale, 3)
    return result


def wrk_nodes(raw, pattern):
    """One wrk run per gateway node, summed (p99: the worst node's)."""
    runs = [wrk(path) for path in sorted(glob.glob(os.path.join(raw, pattern)))]
    return {
        "requests_per_second": round(sum(run["requests_per_second"] for run in runs), 1),
        "requests": sum(run["requests"] for run in runs),
        "non_2xx": sum(run["non_2xx"] for run in runs),
        "p99_ms_worst_node": max((run.get("p99_ms", 0.0) for run in runs), default=0.0),
    }


def k6(path):
    """achieved rate, latency percentiles (ms), failed share, dropped iterations."""
    try:
        data = json.loads(read(path, "{}"))
    except json.JSONDecodeError:
        return {}
    metrics = data.get("metrics", {})
    duration = metrics.get("http_req_duration", {})
    return {
        "requests_per_second": round(metrics.get("http_reqs", {}).get("rate", 0.0), 1),
        "p50_ms": round(duration.get("p(50)", 0.0), 3),
        "p95_ms": round(duration.get("p(95)", 0.0), 3),
        "p99_ms": round(duration.get("p(99)", 0.0), 3),
        "max_ms": round(duration.get("max", 0.0), 3),
        "failed_share": round(metrics.get("http_req_failed", {}).get("value", 0.0), 4),
        "dropped_iterations": int(metrics.get("dropped_iterations", {}).get("count", 0)),
    }


def lag(path):
    samples = []
    for line in read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            samples.append((int(parts[0]), int(parts[1])))
    if not samples:
        return {"samples": 0, "oldest_ms_p99": 0, "oldest_ms_max": 0, "entries_max": 0}
    ages = sorted(age for _, age in samples)
    p99 = ages[min(len(ages) - 1, int(round(0.99 * (len(ages) - 1))))]
    return {
        "samples": len(samples),
        "oldest_ms_p99": p99,
        "oldest_ms_max": ages[-1],
        "entries_max": max(entries for entries, _ in samples),
    }


def freshness(raw, step):
    """Per sink: entries and p50/p99 seconds from an operation (its Redis
    time) to the sink's confirmation, over one step, from the writer's
    histogram before and after it (bucket deltas, interpolated within a
    bucket as Prometheus' histogram_quantile does)."""
    def buckets(path):
        counts = {}
        for line in read(path).splitlines():
            parts = line.split()
            if len(parts) == 3:
                try:
                    counts.setdefault(parts[0], {})[float(parts[1])] = float(parts[2])
                except ValueError:
                    pass
        return counts
    before = buckets(os.path.join(raw, f"freshness-{step}-before.txt"))
    after = buckets(os.path.join(raw, f"freshness-{step}-after.txt"))
    result = {}
    for sink, counts in after.items():
        deltas = sorted((le, count - before.get(sink, {}).get(le, 0.0)) for le, count in counts.items())
        total = deltas[-1][1] if deltas else 0.0
        if total <= 0:
            result[sink] = {"entries": 0, "p50_s": None, "p99_s": None}
            continue

        def quantile(q):
            rank = q * total
            lower, below = 0.0, 0.0
            for le, count in deltas:
                if count >= rank:
                    if le == float("inf"):
                        return lower
                    if count == below:
                        return le
                    return lower + (le - lower) * (rank - below) / (count - below)
                lower, below = le, count
            return lower

        result[sink] = {"entries": int(total), "p50_s": round(quantile(0.5), 3), "p99_s": round(quantile(0.99), 3)}
    return result


def snapshot(path):
    """name -> value lines of a scripts/bench snapshot (CPU ticks, coalescing sums)."""
    values = {}
    for line in read(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = values.get(parts[0], 0.0) + float(parts[1])
            except ValueError:
                pass
    return values


def step_profile(raw, step):
    """CPU shares (of one core) and coalescing over one step, from its two snapshots."""
    before = snapshot(os.path.join(raw, f"cpu-{step}-before.txt"))
    after = snapshot(os.path.join(raw, f"cpu-{step}-after.txt"))
    if not before or not after:
        return {}
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = max(after.get("clock", 0) - before.get("clock", 0), 1e-9)
    delta = lambda name: after.get(name, 0) - before.get(name, 0)
    share = lambda name: round(delta(name) / hz / seconds, 2)
    batches = delta("invgw_coalesced_batch_size_count")
    return {
        "seconds": round(seconds, 1),
        "cpu_share_of_one_core": {
            "redis": share("redis"),
            "gateway_a": share("gateway-a"),
            "gateway_b": share("gateway-b"),
            "machine": share("all"),
        },
        # Redis's time in FCALL (the scripts, with the commands they run) over the step.
        "redis_fcall_seconds": round(delta("redis_usec_fcall") / 1e6, 3),
        "redis_fcalls": int(delta("redis_calls_fcall")),
        "batches": int(batches),
        "batch_size_mean": round(delta("invgw_coalesced_batch_size_sum") / batches, 2) if batches else None,
        "batch_wait_mean_ms": round(1000 * delta("invgw_coalesced_wait_seconds_sum") / batches, 3) if batches else None,
    }


def ratio(value, baseline):
    return round(value / baseline, 3) if baseline else None


def svg_bars(title, groups, series, path):
    """A grouped bar chart: groups of bars (one per series), values in ms."""
    width, height, left, bottom, top = 760, 360, 60, 90, 40
    values = [value for _, bars in groups for value in bars if value is not None]
    peak = max(values + [1e-9])
    plot_w, plot_h = width - left - 20, height - top - bottom
    slot = plot_w / max(1, len(groups))
    bar_w = slot * 0.8 / max(1, len(series))
    colours = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
    ]
    for tick in range(5):
        value = peak * tick / 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(f'<text x="{left - 5}" y="{y + 4}" text-anchor="end">{value:.2f}</text>')
        parts.append(f'<line x1="{left}" y1="{y}" x2="{left + plot_w}" y2="{y}" stroke="#ddd"/>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle">ms</text>')
    for index, (label, bars) in enumerate(groups):
        x0 = left + slot * index + slot * 0.1
        for position, value in enumerate(bars):
            if value is None:
                continue
            bar_h = plot_h * value / peak
            x = x0 + bar_w * position
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" height="{bar_h:.1f}" fill="{colours[position % len(colours)]}"/>'
            )
        parts.append(
            f'<text x="{x0 + slot * 0.4:.1f}" y="{top + plot_h + 14}" text-anchor="end" transform="rotate(-30 {x0 + slot * 0.4:.1f} {top + plot_h + 14})">{label}</text>'
        )
    for position, name in enumerate(series):
        x = left + 10 + position * 90
        parts.append(f'<rect x="{x}" y="{height - 18}" width="10" height="10" fill="{colours[position % len(colours)]}"/>')
        parts.append(f'<text x="{x + 14}" y="{height - 9}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))


def aims_not_met(report, engine, reserve, evalsha, health, at_ceiling, k6_reserve, common_reserve, scheduled_60):
    """The reservation aims this run did not meet, each with what it would take, from this run's figures."""
    def fmt(value, digits=1):
        return "n/a" if value is None else f"{value:,.{digits}f}"

    out = ["", "### Reservation aims not met in this run: what each would take", ""]
    rows = []
    k32 = next((row for row in engine if row.get("holds_per_call") == 32), None)
    if k32 and k32.get("ratio") is not None and k32["ratio"] < 5:
        per_call_us = 1e6 / k32["baseline_calls_per_second"]
        budget_us = 32 * per_call_us / 5
        spent_us = 32 * 1e6 / k32["reservations_per_second"]
        rows.append(
            f"- **Engine, k = 32: {k32['ratio']:.2f}× of EVALSHA (aim 5×).** Our client's EVALSHA round trip took "
            f"{per_call_us:,.0f} µs; 5× means a call of 32 holds in {budget_us:,.0f} µs ({budget_us / 32:.1f} µs a hold, "
            f"client and Redis together); this run's took {spent_us:,.0f} µs on average ({spent_us / 32:.1f} µs a hold). "
            + (
                f"Redis alone spent {k32['redis_us_per_hold']:.1f} µs a hold in FCALL (commandstats; issue 11's "
                "profile put ~6 µs of a hold in Redis commands and the rest in Lua), "
                + ("more than the whole budget" if k32["redis_us_per_hold"] >= budget_us / 32 else "within the budget")
                + f", and the client and the network the remaining ~{max(spent_us / 32 - k32['redis_us_per_hold'], 0):.0f} µs "
                "(arguments as strings, the reply decoded into a JSON value). "
                if k32.get("redis_us_per_hold") else ""
            )
            + "Next "
            "levers: one ledger entry per batch instead of one per hold (~5 µs a hold in Redis), and a compact reply "
            "decoded without an intermediate JSON value."
        )
    cpu = at_ceiling.get("cpu_share_of_one_core", {})
    rps = reserve.get("requests_per_second") or 0
    ratio_http = report["reservations"].get("ratio_to_evalsha")
    if rps and ratio_http is not None and ratio_http < 0.5 and cpu:
        us = lambda share: share * 1e6 / rps
        target = 0.5 * evalsha
        cpus = report["machine"]["cpus"]
        rows.append(
            f"- **HTTP: {ratio_http:.3f} of EVALSHA (aim 0.5).** At the ceiling each reservation cost "
            f"{us(cpu.get('redis', 0)):.0f} µs of Redis CPU, {us(cpu.get('gateway_a', 0) + cpu.get('gateway_b', 0)):.0f} µs "
            f"of gateway CPU and {us(cpu.get('machine', 0)):.0f} µs of the whole machine's (load generator included), with "
            f"the machine at {cpu.get('machine', 0)} of its {cpus} cores and Redis at {cpu.get('redis', 0)} of one: the "
            f"machine, not Redis, is the limit. "
            + (
                f"Of Redis's {us(cpu.get('redis', 0)):.0f} µs a reservation, "
                f"{at_ceiling['redis_fcall_seconds'] * 1e6 / (rps * at_ceiling['seconds']):.0f} µs were in scripts "
                f"({at_ceiling['redis_fcalls'] / (rps * at_ceiling['seconds']):.2f} FCALLs a reservation: its claim, its "
                "share of a batch, the writer's relay calls), the rest in network I/O, the event loop and commands "
                "outside scripts. "
                if at_ceiling.get("redis_fcalls") else ""
            )
            + f"0.5 is {target:,.0f} reservations/s, {cpus * 1e6 / target:.0f} µs of "
            f"the whole machine per reservation, while the gateway's HTTP stack alone (`/health`, {fmt(health.get('requests_per_second'), 0)}/s) "
            f"already costs {cpus * 1e6 / max(health.get('requests_per_second') or 1, 1):.0f} µs of it per request. Not "
            "reachable on this 2-core machine with the load generator beside it; the figure to drive down is CPU per "
            "reservation. Next levers: the claim (every request's first script call: positional arguments instead of "
            "a JSON object, cheaper checks), and the gateway's context switches between its HTTP threads and the "
            "runtime that owns the Redis connections."
        )
    achieved = k6_reserve.get("requests_per_second") or 0
    if (k6_reserve.get("p99_ms") or 0) > 25:
        line = (
            f"- **Reservation p99 at 60% of the ceiling: {fmt(k6_reserve.get('p99_ms'), 1)} ms (aim ≤ 25 ms).** k6 "
            f"achieved {fmt(achieved, 0)} of the {fmt(scheduled_60, 0)}/s scheduled"
        )
        if scheduled_60 and achieved < 0.9 * scheduled_60:
            line += ": the load generator could not keep the schedule, so this measures an overloaded machine"
        if common_reserve.get("p99_ms") is not None:
            line += (
                f". At a rate the load generator achieves ({fmt(common_reserve.get('requests_per_second'), 0)}/s), "
                f"p99 is {fmt(common_reserve.get('p99_ms'), 1)} ms"
                + (" (aim met)" if common_reserve["p99_ms"] <= 25 else "")
            )
        rows.append(line + ".")
    if not rows:
        measured = k32 is not None and rps and k6_reserve.get("p99_ms") is not None
        rows = ["Every reservation aim was met." if measured else "Not all of them were measured in this run "
                "(`--quick` skips the engine, or a step failed): no verdict."]
    return out + rows


def main():
    raw, out, quick, profile = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    hello = wrk(os.path.join(raw, "wrk-hello.txt"))
    health = wrk(os.path.join(raw, "wrk-health.txt"))
    reads = wrk(os.path.join(raw, "wrk-reads.txt"))
    reserve = wrk_nodes(raw, "wrk-reserve-*.txt")
    carts = wrk_nodes(raw, "wrk-cart-*.txt")
    try:
        engine = json.loads(read(os.path.join(raw, "engine.json"), "[]"))
    except json.JSONDecodeError:
        engine = []
    at_ceiling = step_profile(raw, "ceiling")
    at_60 = step_profile(raw, "reserve-60")
    match = re.search(r"([\d.]+)\s+requests per second", read(os.path.join(raw, "redis-evalsha.txt")))
    evalsha = float(match.group(1)) if match else 0.0
    k6_hello = k6(os.path.join(raw, "k6-hello.json"))
    k6_reads = k6(os.path.join(raw, "k6-reads.json"))
    k6_reserve = k6(os.path.join(raw, "k6-reserve.json"))
    common_rate = float(read(os.path.join(raw, "common-rate.txt"), "0").strip() or 0)
    common_reserve = k6(os.path.join(raw, "k6-common-reserve.json"))
    reserve_common_rate = float(read(os.path.join(raw, "reserve-common-rate.txt"), "0").strip() or 0)
    common_hello = k6(os.path.join(raw, "k6-common-hello.json"))
    common_reads = k6(os.path.join(raw, "k6-common-reads.json"))
    uncached = k6(os.path.join(raw, "k6-uncached.json"))
    try:
        propagation = json.loads(read(os.path.join(raw, "propagation.json"), "{}") or "{}")
    except json.JSONDecodeError:
        propagation = {}

    def cache_counts(path):
        counts = {}
        for line in read(path).splitlines():
            found = re.search(r'result="(\w+)".* (\d+(?:\.\d+)?)$', line)
            if found:
                counts[found.group(1)] = float(found.group(2))
        return counts

    before_c, after_c = cache_counts(os.path.join(raw, "cache-c-before.txt")), cache_counts(os.path.join(raw, "cache-c-after.txt"))
    uncached_counts = {name: int(after_c.get(name, 0) - before_c.get(name, 0)) for name in after_c}
    scenarios = {}
    for name in ["browse", "flash-sale", "checkout", "ingest"]:
        text = read(os.path.join(raw, f"{name}.json"))
        if text:
            scenarios[name] = json.loads(text)
            scenarios[name]["writer_lag"] = lag(os.path.join(raw, f"lag-{name}.txt"))
    audit_text = read(os.path.join(raw, "audit.txt"))
    drifts = len(re.findall(r"^drift:", audit_text, re.M))
    entries = re.search(r"audit: (\d+) entries in postgresql, (\d+) not yet relayed", audit_text)
    ceiling_lag = lag(os.path.join(raw, "lag-ceiling.txt"))
    fresh = freshness(raw, "ceiling")
    fresh_pg = fresh.get("postgresql", {})
    fresh_kafka = fresh.get("kafka", {})
    oversold = sum(s["check"]["units_oversold"] for s in scenarios.values())
    unaccounted = sum(s["check"]["units_unaccounted"] for s in scenarios.values())
    flash = scenarios.get("flash-sale", {}).get("outcomes", {})
    # Checkout carts by how their lines say where to hold (the allocator's
    # placement and split beside carts of fixed locations), p99 ms.
    checkout = scenarios.get("checkout", {})
    checkout_outcomes = checkout.get("outcomes", {})
    placing = {
        request["name"]: request["p99_ms"]
        for request in checkout.get("requests", [])
        if request["name"] in ("reserve", "reserve_anywhere", "reserve_split")
    }
    for name in ("reserve", "reserve_anywhere", "reserve_split"):
        placing.setdefault(name, None)
    for name, key in (("reserve_anywhere", "anywhere_ratio"), ("reserve_split", "split_ratio")):
        fixed, other = placing["reserve"], placing[name]
        placing[key] = other / fixed if fixed and other is not None else None
    before = snapshot(os.path.join(raw, "sales-flash-sale-before.txt"))
    after = snapshot(os.path.join(raw, "sales-flash-sale-after.txt"))
    gateway_sale = {
        name: int(after.get(name, 0) - before.get(name, 0))
        for name in ("held", "insufficient", "units_left", "throttled", "throttle_admitted", "customer_limit")
    }
    customer_limit = {
        "units_max": int(os.environ.get("CUSTOMER_UNITS_MAX", "0")),
        "refused_by_gateways": gateway_sale["customer_limit"],
        "refused_seen_by_clients": flash.get("customer_limited", 0),
    }
    # The throttled key: attempts admitted over the scenario against the
    # bucket's bound (budget x seconds + one second's burst).
    throttle_rate = int(os.environ.get("THROTTLE_RATE", "0"))
    throttle_seconds = after.get("at", 0.0) - before.get("at", 0.0)
    throttle = {
        "attempts_per_second": throttle_rate,
        "seconds": throttle_seconds,
        "admitted": gateway_sale["throttle_admitted"],
        "bound": int(throttle_rate * throttle_seconds) + throttle_rate,
        "refused_by_gateways": gateway_sale["throttled"],
        "refused_seen_by_clients": flash.get("throttled", 0),
    }
    throttle["within_bound"] = throttle["admitted"] <= throttle["bound"]
    lock = read("Cargo.lock")
    goose_version = re.search(r'name = "goose"\nversion = "([^"]+)"', lock)

    report = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "build_profile": profile,
        "machine": {
            "cpus": os.cpu_count(),
            "memory": next((line.split(":")[1].strip() for line in read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "?"),
            "kernel": platform.release(),
            "cpu_model": next((line.split(":")[1].strip() for line in read("/proc/cpuinfo").splitlines() if line.startswith("model name")), "?"),
        },
        "versions": {
            "rustc": command_version("rustc", "--version"),
            "redis": command_version("redis-server", "--version"),
            "postgresql": command_version("/usr/lib/postgresql/15/bin/postgres", "--version"),
            "wrk": command_version("wrk", "-v"),
            "k6": command_version(os.path.expanduser("~/.cargo/invgw-k6/bin/k6"), "version"),
            "goose": goose_version.group(1) if goose_version else "?",
        },
        "config": {
            "gateway_nodes": 2,
            "gateway_threads_per_node": 2,
            "catalog_keys": 2000 if quick else 100000,
            "ceiling_tool": "wrk -t2 -c64 (reads, hello); wrk -t1 -c64 per node (reservations); wrk -t1 -c32 per node (3-line carts)",
            "latency_tool": "k6 constant-arrival-rate (open loop) at 60% of the wrk ceiling",
            "scenario_tool": "goose (closed loop: users wait for each answer)",
        },
        "baselines": {
            "hello_ceiling": hello,
            "gateway_health_ceiling": health,
            "redis_evalsha_requests_per_second": evalsha,
            "hello_latency_at_60pct": k6_hello,
        },
        "reads": {
            "ceiling": reads,
            "ratio_to_hello": ratio(reads["requests_per_second"], hello["requests_per_second"]),
            "health_ratio_to_hello": ratio(health["requests_per_second"], hello["requests_per_second"]),
            "ratio_to_health": ratio(reads["requests_per_second"], health["requests_per_second"]),
            "uncached_40_locations_3_node_sale": {"latency": uncached, "cache_results_on_node_c": uncached_counts},
            "propagation_a_to_b": propagation,
            "latency_at_60pct": k6_reads,
            "p99_delta_to_hello_ms": round(k6_reads.get("p99_ms", 0) - k6_hello.get("p99_ms", 0), 3) if k6_reads and k6_hello else None,
            "latency_at_common_rate": {"hello": common_hello, "reads": common_reads},
            "p99_delta_to_hello_at_common_rate_ms": round(common_reads.get("p99_ms", 0) - common_hello.get("p99_ms", 0), 3) if common_reads and common_hello else None,
        },
        "reservations": {
            "ceiling": reserve,
            "ratio_to_evalsha": ratio(reserve["requests_per_second"], evalsha),
            "latency_at_60pct": k6_reserve,
            "latency_at_common_rate": common_reserve,
            "writer_lag_at_ceiling": ceiling_lag,
            "at_ceiling": at_ceiling,
            "at_60pct": at_60,
            "engine": engine,
            "carts_3_lines": carts,
            "checkout_p99_ms_by_placing": placing,
        },
        "scenarios": scenarios,
        "freshness_at_reservation_ceiling": fresh,
        "correctness": {
            "units_oversold": oversold,
            "units_unaccounted": unaccounted,
            "ledger_drifts": drifts,
            "ledger_entries_lost": drifts,
            "ledger_entries_audited": int(entries.group(1)) + int(entries.group(2)) if entries else 0,
            "flash_sale_refusals": flash.get("refused", 0),
            "refused_while_units_remained": flash.get("refused_while_available", 0),
            "flash_sale_gateways": gateway_sale,
            "flash_sale_throttle": throttle,
            "flash_sale_customer_limit": customer_limit,
        },
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)

    svg_bars(
        "Latency at 60% of each ceiling (k6, open loop)",
        [
            ("bare hyper", [k6_hello.get("p50_ms"), k6_hello.get("p95_ms"), k6_hello.get("p99_ms")]),
            ("cached reads", [k6_reads.get("p50_ms"), k6_reads.get("p95_ms"), k6_reads.get("p99_ms")]),
            ("hot reservations", [k6_reserve.get("p50_ms"), k6_reserve.get("p95_ms"), k6_reserve.get("p99_ms")]),
        ],
        ["p50", "p95", "p99"],
        os.path.join(out, "latency.svg"),
    )
    groups = []
    for name, scenario in scenarios.items():
        for request in scenario["requests"][:3]:
            groups.append((f"{name}: {request['name']}", [request["p50_ms"], request["p95_ms"], request["p99_ms"]]))
    svg_bars("Scenario latency (goose)", groups, ["p50", "p95", "p99"], os.path.join(out, "scenarios.svg"))

    def fmt(value, digits=1):
        return "n/a" if value is None else f"{value:,.{digits}f}"

    lines = [
        "# Benchmark report",
        "",
        f"Generated {report['generated_at']} by `scripts/bench{' --quick' if quick else ''}` ({profile} build) on "
        f"{report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}), {report['machine']['memory']}. "
        "Every figure below comes from this one run; ratios are against baselines measured in the same run, "
        "on the same machine, with the same tool and connections. The machine is shared and noisy: compare "
        "ratios, not absolute numbers, between runs.",
        "",
        "Tools: ceilings with wrk (the fewest cycles per request, so the most CPU left to the system under test); "
        "latency with k6's constant-arrival-rate executor (open loop: requests are sent on schedule whether or not "
        "earlier ones were answered, so queueing shows in the percentiles); scenarios with goose (closed loop, "
        "for the mix and the correctness checks). Load generator and system share the 2 cores.",
        "",
        "## Headline figures",
        "",
        "| figure | measured | baseline | ratio | aim |",
        "|---|---|---|---|---|",
        f"| cached availability reads, req/s (wrk) | {fmt(reads['requests_per_second'])} | bare hyper {fmt(hello['requests_per_second'])} | {fmt(report['reads']['ratio_to_hello'], 3)} | ≥ 0.9 |",
        f"| the gateway's HTTP stack alone (pingora `/health`), req/s (wrk) | {fmt(health['requests_per_second'])} | bare hyper {fmt(hello['requests_per_second'])} | {fmt(report['reads']['health_ratio_to_hello'], 3)} | (the ceiling of any local answer) |",
        f"| cached availability reads / `/health` (wrk) | {fmt(reads['requests_per_second'])} | `/health` {fmt(health['requests_per_second'])} | {fmt(report['reads']['ratio_to_health'], 3)} | |",
        f"| uncached read p99, 40 locations, one in a 3-node sale (k6) | {fmt(uncached.get('p99_ms'), 3)} ms (p50 {fmt(uncached.get('p50_ms'), 3)} ms, {fmt(uncached.get('requests_per_second'), 0)}/s; node-c: {uncached_counts.get('miss', 0):,} fills, {uncached_counts.get('joined', 0):,} joined, {uncached_counts.get('hit', 0):,} hits) | | | |",
        f"| propagation A → B, SSE event, p50 / p99 / max | {fmt(propagation.get('sse', {}).get('p50_ms'), 2)} / {fmt(propagation.get('sse', {}).get('p99_ms'), 2)} / {fmt(propagation.get('sse', {}).get('max_ms'), 2)} ms ({propagation.get('sse', {}).get('samples', 0)} changes, {propagation.get('sse_never_shown', '?')} never shown) | | | p99 ≤ 50 ms |",
        f"| propagation A → B, first read showing it, p50 / p99 / max | {fmt(propagation.get('read', {}).get('p50_ms'), 2)} / {fmt(propagation.get('read', {}).get('p99_ms'), 2)} / {fmt(propagation.get('read', {}).get('max_ms'), 2)} ms ({propagation.get('read', {}).get('samples', 0)} changes, {propagation.get('read_never_shown', '?')} never shown) | | | p99 ≤ 50 ms |",
        f"| cached reads p99 at 60% of ceiling (k6) | {fmt(k6_reads.get('p99_ms'), 3)} ms | bare hyper {fmt(k6_hello.get('p99_ms'), 3)} ms | Δ {fmt(report['reads']['p99_delta_to_hello_ms'], 3)} ms | Δ ≤ 1 ms |",
        f"| hot-SKU reservations over 2 nodes, req/s (wrk) | {fmt(reserve['requests_per_second'])} | EVALSHA `return 1` {fmt(evalsha)} | {fmt(report['reservations']['ratio_to_evalsha'], 3)} | ≥ 0.5 |",
        f"| cached reads p99 at a common {fmt(common_rate, 0)} req/s (k6) | {fmt(common_reads.get('p99_ms'), 3)} ms | bare hyper {fmt(common_hello.get('p99_ms'), 3)} ms | Δ {fmt(report['reads']['p99_delta_to_hello_at_common_rate_ms'], 3)} ms | Δ ≤ 1 ms |",
        f"| reservations p99 at 60% of ceiling (k6) | {fmt(k6_reserve.get('p99_ms'), 3)} ms (p50 {fmt(k6_reserve.get('p50_ms'), 3)} ms) | | | ≤ 25 ms |",
        f"| reservations p99 at a common {fmt(reserve_common_rate, 0)} req/s (k6) | {fmt(common_reserve.get('p99_ms'), 3)} ms (p50 {fmt(common_reserve.get('p50_ms'), 3)} ms) | | | ≤ 25 ms |",
        f"| 3-line carts over 2 nodes, carts/s (wrk) | {fmt(carts['requests_per_second'])} (p99 {fmt(carts['p99_ms_worst_node'], 2)} ms, {carts['non_2xx']:,} non-2xx) | | | no regression |",
        f"| checkout carts p99 (goose): lines naming their location / none / one line split | {fmt(placing['reserve'], 2)} / {fmt(placing['reserve_anywhere'], 2)} / {fmt(placing['reserve_split'], 2)} ms ({checkout_outcomes.get('split_lines', 0):,} carts held a line across locations) | fixed-location carts | {fmt(placing['anywhere_ratio'], 2)} / {fmt(placing['split_ratio'], 2)} | (figure) |",
        f"| writer lag p99 at the reservation ceiling | {fmt(ceiling_lag['oldest_ms_p99'] / 1000.0, 2)} s (max {fmt(ceiling_lag['oldest_ms_max'] / 1000.0, 2)} s, {ceiling_lag['entries_max']:,} entries) | | | < 1 s |",
        f"| freshness at the reservation ceiling: operation → PostgreSQL row, p50 / p99 | {fmt(fresh_pg.get('p50_s'), 2)} / {fmt(fresh_pg.get('p99_s'), 2)} s ({fresh_pg.get('entries', 0):,} entries; → Kafka {fmt(fresh_kafka.get('p50_s'), 2)} / {fmt(fresh_kafka.get('p99_s'), 2)} s) | | | p99 < 2 s |",
        f"| units oversold (all scenarios) | {oversold} | | | 0 |",
        f"| units unaccounted for (all scenarios) | {unaccounted} | | | 0 |",
        f"| ledger entries lost (audit drifts) | {drifts} of {report['correctness']['ledger_entries_audited']:,} audited | | | 0 |",
        f"| flash sale: checkout throttle of {throttle_rate}/s on one of its 3 keys | {throttle['admitted']:,} attempts admitted in {fmt(throttle_seconds, 1)} s (bound {throttle['bound']:,}); {throttle['refused_by_gateways']:,} refused 429 by the gateways, {throttle['refused_seen_by_clients']:,} seen by the clients | | | ≤ bound |",
        f"| flash sale: limit of {customer_limit['units_max']} units per customer on one of its 3 keys (10,000 buyers) | {customer_limit['refused_by_gateways']:,} refused 409 customer_limit by the gateways, {customer_limit['refused_seen_by_clients']:,} seen by the clients | | | (figure) |",
        f"| flash sale: refused while units remained elsewhere | the gateways' count {gateway_sale['units_left']} of {gateway_sale['insufficient']} refusals ({gateway_sale['held']} holds); the clients' estimate {report['correctness']['refused_while_units_remained']} of {report['correctness']['flash_sale_refusals']} | | | (figure) |",
        "",
        "What k6 achieved against what was scheduled (when the load generator itself cannot keep the schedule, "
        "the 60% figures measure an overloaded machine rather than the system, and the common-rate rows are the "
        "like-for-like comparison):",
        "",
        "| run | scheduled req/s | achieved req/s | dropped iterations | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    scheduled = {
        "bare hyper at 60%": 0.6 * hello["requests_per_second"],
        "cached reads at 60%": 0.6 * reads["requests_per_second"],
        "reservations at 60%": 0.6 * reserve["requests_per_second"],
        "bare hyper at common rate": common_rate,
        "cached reads at common rate": common_rate,
        "reservations at common rate": reserve_common_rate,
    }
    for label, run in [
        ("bare hyper at 60%", k6_hello),
        ("cached reads at 60%", k6_reads),
        ("reservations at 60%", k6_reserve),
        ("bare hyper at common rate", common_hello),
        ("cached reads at common rate", common_reads),
        ("reservations at common rate", common_reserve),
    ]:
        lines.append(
            f"| {label} | {fmt(scheduled[label], 0)} | {fmt(run.get('requests_per_second'), 0)} | "
            f"{run.get('dropped_iterations', 0):,} | {fmt(run.get('p50_ms'), 3)} | {fmt(run.get('p99_ms'), 3)} |"
        )
    lines += [
        "",
        "### Reservations: the engine, and where the CPU goes",
        "",
        "The engine alone (criterion, one connection, before the gateways start): holds per second through the "
        "allocator's batched call with k holds per call, and a whole one-line request (claim, then hold), each "
        "against EVALSHA of `return 1` through the same client measured just before it. Aim: ≥ 5× at k = 32.",
        "",
        "| variant | holds per call | reservations/s | EVALSHA `return 1` calls/s, same client | ratio | ratio to redis-benchmark's | p50 per call | p99 per call | Redis time in FCALL per hold (per request: its FCALLs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in engine:
        redis_time = fmt(row.get("redis_us_per_hold"), 1) + " µs"
        if row.get("holds_per_call") == 1 and (row.get("fcalls_per_call") or 1) > 1:
            redis_time += f" ({fmt(row['fcalls_per_call'], 1)} FCALLs)"
        lines.append(
            f"| {row['variant']} | {row['holds_per_call']} | {fmt(row['reservations_per_second'], 0)} | "
            f"{fmt(row['baseline_calls_per_second'], 0)} | {fmt(row['ratio'], 2)} | {fmt(row.get('ratio_to_redis_benchmark'), 2)} | "
            f"{fmt(row['p50_us_per_call'], 0)} µs | {fmt(row['p99_us_per_call'], 0)} µs | {redis_time} |"
        )
    if not engine:
        lines.append("| (not run: `--quick`) | | | | | | | | |")
    elif engine[0].get("redis_benchmark_calls_per_second"):
        lines += [
            "",
            f"`redis-benchmark` EVALSHA of `return 1` on one connection in the same run: "
            f"{fmt(engine[0]['redis_benchmark_calls_per_second'], 0)} calls/s. Our client's own round trip costs "
            "more than its (the first ratio is against our client, the second against the tool).",
        ]
    lines += [
        "",
        "Over HTTP, CPU time of each process as a share of one core (the machine has "
        f"{report['machine']['cpus']}; load generators take the rest), and what coalescing did, both nodes together:",
        "",
        "| step | redis | gateway a | gateway b | whole machine | batches | mean batch | mean wait of a batch's oldest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, profile in [("hot-SKU ceiling (wrk)", at_ceiling), ("60% of it (k6)", at_60)]:
        cpu = profile.get("cpu_share_of_one_core", {})
        lines.append(
            f"| {label} | {cpu.get('redis', 'n/a')} | {cpu.get('gateway_a', 'n/a')} | {cpu.get('gateway_b', 'n/a')} | "
            f"{cpu.get('machine', 'n/a')} | {profile.get('batches', 'n/a')} | {fmt(profile.get('batch_size_mean'), 2)} | "
            f"{fmt(profile.get('batch_wait_mean_ms'), 3)} ms |"
        )
    lines += aims_not_met(report, engine, reserve, evalsha, health, at_ceiling, k6_reserve, common_reserve,
                          scheduled["reservations at 60%"])
    lines += [
        "",
        "![latency at 60% of each ceiling](latency.svg)",
        "",
        "## Scenarios (goose)",
        "",
        "| scenario | request | req/s | p50 ms | p95 ms | p99 ms | max ms | errors | 409 | writer lag p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scenario in scenarios.items():
        for request in scenario["requests"]:
            lines.append(
                f"| {name} | {request['name']} | {fmt(request['requests_per_second'])} | {fmt(request['p50_ms'], 2)} | "
                f"{fmt(request['p95_ms'], 2)} | {fmt(request['p99_ms'], 2)} | {fmt(request['max_ms'], 2)} | "
                f"{request['error_rate']:.2%} | {request['conflict_rate']:.2%} | {scenario['writer_lag']['oldest_ms_p99']} ms |"
            )
    lines += ["", "![scenario latency](scenarios.svg)", "", "| scenario | users | outcomes | stock check |", "|---|---|---|---|"]
    for name, scenario in scenarios.items():
        outcomes = ", ".join(f"{key} {value}" for key, value in scenario["outcomes"].items() if value)
        check = scenario["check"]
        lines.append(
            f"| {name} | {scenario['users']} | {outcomes or '-'} | oversold {check['units_oversold']}, "
            f"unaccounted {check['units_unaccounted']} over {check['keys_checked']} keys |"
        )
    lines += [
        "",
        "## How to read this",
        "",
        "- *Ratios* divide our figure by a baseline from the same run: the bare hyper server (the cost of HTTP "
        "alone on this machine) for reads, and `redis-benchmark` running EVALSHA of `return 1` on the same Redis "
        "(the cost of one script round trip) for reservations. A ratio above 1.0 for reservations means "
        "coalescing put several reservations into one script call.",
        "- *`/health`* is the same gateway answering a route that touches nothing (no cache, no Redis): what "
        "pingora's HTTP pipeline costs by itself here (the floor of any answer the gateway gives), so "
        "`reads / /health` shows how close a cached read comes to that floor.",
        "- *Uncached reads* go to a third node whose cache keeps nothing (`availability_ttl_ms = 1`): every read "
        "loads the SKU's 40 locations and the sale's three buckets (three pipelined round trips); concurrent "
        "readers share one fill (`joined`).",
        "- *Propagation* (the `propagation` probe, during the common-rate reads): each of its reservations on node "
        "A is timed from A's 201 to the first event on a stream from node B showing it, and to the first read on "
        "node B (polled every 1 ms) showing it; a change never shown within 2 s is counted apart, never as fast.",
        "- *Latency at 60%* is measured open loop at 60% of the ceiling wrk found; compare our p99 with the bare "
        "server's p99 at its own 60%.",
        "- *Writer lag* is the age of the oldest outbox entry not yet in Kafka and PostgreSQL, sampled every 0.5 s "
        "from the writer's `/metrics`.",
        "- *Freshness* is the writer's `invgw_writer_entry_visible_seconds`: for every entry the ceiling step made, "
        "from its operation's Redis time (its stream id) until PostgreSQL committed its row (visible to the views) "
        "or Kafka confirmed it (acks=all), read before and after the step; quantiles interpolated within the "
        "histogram's buckets as `histogram_quantile` does.",
        "- *Correctness* is checked every run: each scenario reads its keys back over HTTP (oversold: sold beyond "
        "what was available at the start; unaccounted: on hand at the start + added − sold ≠ on hand at the end), "
        "and `ledger-writer audit` replays the ledger against Redis after the run.",
        "- *Refused while units remained elsewhere*: the gateways' count is `invgw_sale_refused_with_units_left_total` "
        "summed over the nodes around the scenario (a refusal after the hot path's last round while a read of the "
        "key right after still showed the units asked for); the clients' estimate is a refusal after which the "
        "client's own read of the key still showed units available, an upper bound, as that read comes a moment "
        "after the refusal (and over HTTP, through the cache).",
        "",
        f"Versions: {', '.join(f'{key} {value}' for key, value in report['versions'].items())}.",
        "Raw output (wrk, k6, goose HTML reports, lag samples, audit) is in `raw/` next to this report (not checked in).",
    ]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
