"""Markdown tables from result files, for docs/benchmarks.md (so no number is copied by hand).

.venv/bin/python bench/report.py bench/results/mesh_http-run3.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rows(result: dict[str, Any]) -> list[str]:
    out = []
    direct = next((r for r in result["results"] if r["name"] == "direct"), None)
    for r in result["results"]:
        lat = r["latency_ms"]
        added = ""
        if direct is not None and r is not direct:
            added = f"+{lat['p50'] - direct['latency_ms']['p50']:.2f}"
        procs = "<br>".join(
            f"{p['label']}: {p['cpu_s']:.1f} s, {p['cpu_us_per_request']:.0f} µs/req, "
            f"{p['max_rss_mib']:.0f} MiB"
            for p in r["processes"]
        )
        cpu = r.get("cpu", {})
        out.append(
            f"| {r['name']} | {r['rps']:,.0f} | {lat['p50']:.2f} | {added} | {lat['p90']:.2f} "
            f"| {lat['p99']:.2f} | {r['error_count']} | {procs} "
            f"| {cpu.get('machine_cores_busy', '?')} / {cpu.get('other_cores', '?')} "
            f"| {r['loadavg_before'][0]:.2f} → {r['loadavg_after'][0]:.2f} |"
        )
    return out


HEAD = (
    "| path | req/s | p50 ms | p50 added | p90 ms | p99 ms | errors "
    "| proxies and nginx: CPU, CPU per request, max RSS | cores busy: machine / not ours "
    "| load avg (1 min) |\n|---|---:|---:|---:|---:|---:|---:|---|---:|---|"
)


def main(paths: list[str]) -> int:
    for path in paths:
        result = json.loads(Path(path).read_text())
        print(f"**{Path(path).name}** — nodemesh {result['versions']['nodemesh']}, "
              f"started {result['started']}, load average at start "
              f"{result['loadavg_at_start']:.2f}\n")  # fmt: skip
        print(HEAD)
        print("\n".join(rows(result)))
        prof = result.get("profile")
        if prof:
            print(f"\nWhile profiled: {prof.get('rps_while_profiling', '?')} req/s.")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
