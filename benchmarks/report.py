"""The benchmark's figures as aligned text tables."""

from typing import Any


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def _cell(value: float | None, width: int, spec: str = ",.0f") -> str:
    """`value` formatted right-aligned in `width` columns; a dash where there is none."""
    return f"{'—':>{width}}" if value is None else f"{value:>{width}{spec}}"


def render_benchmark(result: dict[str, Any]) -> str:
    """The figures as aligned tables: stages, limits and ratios, latency, memory, targets."""
    e2e = result["end_to_end"]
    orders = result["orders"]
    lines = [f"{result['total']:,} orders, {result['workers']} workers, batch "
             f"{result['batch_size']:,}"
             + (f", {result['preload']['orders']:,} preloaded" if "preload" in result else ""),
             "",
             f"{'stage':<12}{'rows':>12}{'busy s':>10}{'rows/s':>12}"]
    lines += [f"{s['stage']:<12}{s['rows']:>12,}{s['seconds']:>10.2f}"
              f"{s['rows_per_second']:>12,.0f}" for s in result["stages"]]
    lines += ["(stage: seconds the workers spent on batches, summed over the workers)",
              "",
              f"end-to-end (first enqueue → views fresh): {e2e['seconds']:.2f} s = "
              f"{e2e['orders_per_second']:,.0f} orders/s; last push → views fresh "
              f"{e2e['last_push_to_views_fresh_seconds']:.2f} s (final promote "
              f"{e2e['final_promote_seconds']:.2f} s + refresh "
              f"{e2e['final_refresh_seconds']:.2f} s)"]
    if result["comparisons"]:
        lines += ["", f"{'stage':<11}{'alone/s':>11}{'overlapped/s':>14}{'raw limit/s':>13}"
                      f"{'alone':>7}{'overl.':>8}{'naive/s':>11}  raw limit (done well)"]
        for c in result["comparisons"]:
            lines.append(
                f"{c['stage']:<11}{_cell(c['alone_rows_per_second'], 11)}"
                f"{_cell(c['overlapped_rows_per_second'], 14)}"
                f"{_cell(c['raw_rows_per_second'], 13)}{_cell(c['ratio'], 7, '.0%')}"
                f"{_cell(c['overlapped_ratio'], 8, '.0%')}"
                f"{_cell(c['naive_rows_per_second'], 11)}  {c['raw_limit']}")
        lines.append("(alone: the product's code one stage at a time on the raw sample; "
                     "overlapped: the same stage in the end-to-end run)")
        limits = result["raw_limits"]["limits"]
        lines.append(
            f"refresh both views at {limits['refresh_full_group_by']['rows']:,} orders: "
            f"incremental {limits['refresh_incremental']['seconds']:.3f} s, full GROUP BY "
            f"over orders {limits['refresh_full_group_by']['seconds']:.3f} s (views match "
            f"full recompute: {limits['views_match_full_recompute']['value']})")
        lines.append(f"serialise + LPUSH variadic (issue's row 1): "
                     f"{limits['serialise_lpush_variadic']['rows_per_second']:,.0f}/s; "
                     f"raw sample {result['raw_limits']['sample_rows']:,} rows, median of "
                     f"{result['raw_limits']['repeats']}")
    dash = result["dashboard"]["all"]
    if dash.get("count"):
        lines += ["", f"dashboard queries during the run: {dash['count']:,}, p50 "
                      f"{dash['p50_ms']:.1f} ms, p95 {dash['p95_ms']:.1f} ms, p99 "
                      f"{dash['p99_ms']:.1f} ms, max {dash['max_ms']:.1f} ms"]
    fresh = result.get("fresh_after_batch")
    if fresh:
        lines.append(f"views fresh after a {fresh['orders']:,}-order batch with "
                     f"{fresh['orders_present_before']:,} present: "
                     f"{fresh['views_fresh_seconds']:.2f} s (promote "
                     f"{fresh['promote_seconds']:.2f} s, of which rollups "
                     f"{fresh['rollup_update_seconds']:.2f} s; refresh "
                     f"{sum(fresh['refresh_seconds'].values()):.2f} s)")
    rss = result["peak_rss_kib"]
    lines += ["", "peak RSS: " + ", ".join(
        f"{role} {', '.join(_mib(v) for v in value) if isinstance(value, list) else _mib(value)}"
        for role, value in rss.items())]
    cpu = result["cpu"]
    lines.append(f"CPU seconds in the run ({cpu['window_seconds']:.1f} s window, host "
                 f"{cpu['host_busy_percent']:.0f} % busy, steal "
                 f"{cpu['host_steal_percent']:.0f} %): " + ", ".join(
                     f"{role} {s:.1f}" for role, s in cpu["cpu_seconds_by_role"].items()))
    sizes = result["sizes"]
    relation = sizes["relations"]["orders"]
    lines.append(f"orders: {relation['rows']:,} rows, {relation['total_bytes'] / 2**20:,.0f} "
                 f"MiB with indexes ({sizes['orders_bytes_per_order']:.0f} bytes/order); "
                 f"WAL in the run {e2e['wal_bytes'] / 2**20:,.0f} MiB; Redis grew "
                 f"{e2e['redis_memory_growth_bytes'] / 2**20:,.0f} MiB (dedup window)")
    lines.append(f"orders: pushed {orders['pushed']:,}, in orders {orders['orders_rows']:,} "
                 f"(expected {orders['expected_rows']:,}), rejected {orders['rejected']:,}, "
                 f"duplicates {orders['duplicates_dropped']:,} "
                 f"({'verified' if orders['verified'] else 'MISMATCH'})")
    lines += ["", "targets:"] + [
        f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']}: {t['measured']}"
        for t in result["targets"]]
    machine = result["machine"]
    lines += ["", f"{machine['cpu_count']} CPUs ({machine['cpu_model']}), "
                  f"{machine['memory_gib']} GiB, {machine['platform']}, Python "
                  f"{machine['python']}, Polars {machine['polars']}, redis-py "
                  f"{machine['redis_py']}, psycopg {machine['psycopg']}, Postgres "
                  f"{machine['postgres_server']}, Redis {machine['redis_server']}; load "
                  f"{machine['load_average'][0]:.2f} before, "
                  f"{machine['load_average_after'][0]:.2f} after"]
    return "\n".join(lines)
