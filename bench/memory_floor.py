"""What the agent's libraries cost in memory before the agent does anything.

    .venv/bin/python bench/memory_floor.py [--json]

Each row is a fresh interpreter (this venv's) that imports the row's modules and the rows above
it, then reads its own ``/proc/self/status`` (VmRSS, split into anonymous and file-backed pages)
and ``/proc/self/smaps_rollup`` (PSS: file pages shared with other processes counted by share).
The last row imports the agent's own modules, as ``nodemesh agent`` does, so the gap between it
and the row above is nodemesh's own import cost.  The benchmark's ``memory`` workload
(``bench/mesh_http.py``) measures the running agent beside Consul's proxy; this script says how
much of that figure the chosen stack sets before nodemesh runs a line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# Cumulative: each row imports its own modules after every row above it.
ROWS: list[tuple[str, list[str]]] = [
    ("python", []),
    ("+ trio", ["trio"]),
    ("+ ssl", ["ssl"]),
    ("+ h11, h2", ["h11", "h2.connection"]),
    ("+ cryptography.x509", ["cryptography.x509"]),
    ("+ pyOpenSSL", ["OpenSSL.crypto"]),
    ("+ structlog", ["structlog"]),
    ("+ py-consul (requests)", ["consul"]),
    ("+ hdrhistogram, click", ["hdrh.histogram", "click"]),
    ("+ nodemesh agent modules", ["nodemesh.cli", "nodemesh.agent.daemon"]),
]

PROBE = r"""
import json, sys
for m in sys.argv[1:]:
    __import__(m)
out = {"modules": len(sys.modules)}
for line in open("/proc/self/status"):
    k, _, v = line.partition(":")
    if k in ("VmRSS", "RssAnon", "RssFile"):
        out[k] = int(v.split()[0])
for line in open("/proc/self/smaps_rollup"):
    k, _, v = line.partition(":")
    if k == "Pss":
        out["Pss"] = int(v.split()[0])
print(json.dumps(out))
"""


def measure(modules: list[str]) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modules],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result: dict[str, int] = json.loads(out)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args()
    rows = []
    modules: list[str] = []
    for label, more in ROWS:
        modules = modules + more
        rows.append((label, measure(modules)))
    if args.json:
        print(json.dumps({label: r for label, r in rows}, indent=2))
        return 0
    mib = 1024.0
    print(f"{'imported':34} {'RSS MiB':>8} {'anon':>6} {'file':>6} {'PSS':>6} {'modules':>8}")
    for label, r in rows:
        print(
            f"{label:34} {r['VmRSS'] / mib:8.1f} {r['RssAnon'] / mib:6.1f} "
            f"{r['RssFile'] / mib:6.1f} {r['Pss'] / mib:6.1f} {r['modules']:8d}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
