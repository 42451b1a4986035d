"""The load generators besides wrk: their command lines and what their output means (pure).

- h2load, open loop (``--h1 --rps``) and HTTP/2 (``-m``): timed with ``-D``, every request in
  ``--log-file`` (start µs since the epoch, status, µs until the end of the response).  The
  first ``skip_s`` seconds after the first request are warm-up and left out, and the last
  ``TAIL_S`` (requests cut off by the end of the run).  An open-loop run is judged against what
  was offered in that window: requests that never completed count as errors.
- ``apps.py grpc-client``: a JSON summary line, then one latency in µs a line.
- ``apps.py send``: one JSON line for a bulk transfer, timed from connect to the sink's answer.

Percentiles are nearest-rank over every kept request (exact, no histogram buckets).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from measure import BenchError

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
TAIL_S = 0.5  # seconds at the end of an h2load run left out (see parse_h2load_log)


def percentiles_ms(values_us: Sequence[int | float]) -> dict[str, float]:
    """Nearest-rank percentiles, and the max, in ms; {} for no values."""
    if not values_us:
        return {}
    ordered = sorted(values_us)
    n = len(ordered)
    # The rank rounded first: 99.9 / 100 * 1000 is 999.0000000000001 in floating point.
    rank = {k: max(1, math.ceil(round(q * n / 100, 9))) for k, q in PERCENTILES.items()}
    out = {k: ordered[r - 1] / 1000 for k, r in rank.items()}
    out["max"] = ordered[-1] / 1000
    return out


@dataclass(frozen=True)
class H2loadRun:
    """The kept window of an h2load run: its requests by outcome and their latencies."""

    window_s: float
    ok: int  # 2xx responses that started inside the window
    bad_status: int  # responses that were not 2xx (h2load logs a failed stream as status -1/0)
    missing: int  # offered but never logged (open loop only)
    latency_ms: dict[str, float]
    offered_rps: float | None = None
    summary: dict[str, int] = field(default_factory=dict)  # h2load's own "requests:" counts

    @property
    def rps(self) -> float:
        return self.ok / self.window_s

    @property
    def errors(self) -> int:
        return self.bad_status + self.missing


def h2load_argv(
    url: str,
    *,
    clients: int,
    duration: float,
    log_file: str,
    rps_per_client: float | None = None,
    streams: int = 1,
    h1: bool = False,
) -> list[str]:
    argv = ["h2load", "-c", str(clients), "-D", f"{duration:g}", "--log-file", log_file]
    if h1:
        argv.insert(1, "--h1")
    if rps_per_client is not None:
        argv += ["--rps", f"{rps_per_client:g}"]
    if streams > 1:
        argv += ["-m", str(streams)]
    return [*argv, url]


_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)


def parse_h2load_summary(stdout: str) -> dict[str, int]:
    """h2load's "requests: ... total, ... failed" line as numbers ({} when it printed none)."""
    m = _REQUESTS.search(stdout)
    return {k: int(v) for k, v in m.groupdict().items()} if m else {}


def parse_h2load_log(
    text: str,
    *,
    skip_s: float,
    duration_s: float,
    offered_rps: float | None = None,
    stdout: str = "",
) -> H2loadRun:
    """h2load's ``--log-file`` (from a ``-D duration_s`` run) minus its first ``skip_s``."""
    rows: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        except ValueError:
            raise BenchError(f"h2load log: not start/status/µs: {line[:80]!r}") from None
    if not rows:
        raise BenchError(f"h2load logged no request; its output: {stdout[-400:]!r}")
    # Requests still in flight when -D ends are never logged: the last TAIL_S is left out too,
    # so that only a request that took longer than that counts as missing.
    window = duration_s - skip_s - TAIL_S
    if window <= 0:
        raise BenchError(
            f"h2load ran {duration_s:g}s, not more than the {skip_s:g}s skipped + {TAIL_S:g}s"
        )
    t0 = min(r[0] for r in rows) + int(skip_s * 1e6)
    t1 = t0 + int(window * 1e6)
    kept = [r for r in rows if t0 <= r[0] < t1]
    ok = [r[2] for r in kept if 200 <= r[1] < 300]
    missing = 0
    if offered_rps is not None:
        missing = max(0, round(offered_rps * window) - len(kept))
    return H2loadRun(
        window_s=window,
        ok=len(ok),
        bad_status=len(kept) - len(ok),
        missing=missing,
        latency_ms=percentiles_ms(ok),
        offered_rps=offered_rps,
        summary=parse_h2load_summary(stdout),
    )


# --- apps.py's clients -------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcRun:
    concurrency: int
    seconds: float
    calls: int
    errors: dict[str, int]
    peer: str  # what the server saw: "ipv4:IP:PORT <caller identity>"
    latency_ms: dict[str, float]
    error_details: dict[str, str] = field(default_factory=dict)  # code -> its first message

    @property
    def rps(self) -> float:
        return self.calls / self.seconds

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def parse_grpc_log(text: str) -> GrpcRun:
    head, _, rest = text.partition("\n")
    try:
        meta: dict[str, Any] = json.loads(head)
        latencies = [int(v) for v in rest.split()]
    except ValueError as e:
        raise BenchError(f"grpc-client output is not a summary and latencies: {e}") from None
    if meta["calls"] != len(latencies) or meta["seconds"] <= 0:
        raise BenchError(f"grpc-client: {meta['calls']} calls but {len(latencies)} latencies")
    return GrpcRun(
        concurrency=int(meta["concurrency"]),
        seconds=float(meta["seconds"]),
        calls=int(meta["calls"]),
        errors={k: int(v) for k, v in meta["errors"].items()},
        peer=str(meta.get("peer", "")),
        latency_ms=percentiles_ms(latencies),
        error_details={k: str(v) for k, v in meta.get("error_details", {}).items()},
    )


def grpc_peer_ip(peer: str) -> str:
    """ "ipv4:198.18.0.4:51234 spiffe://..." -> "198.18.0.4" ("" when the call failed)."""
    addr = peer.split(" ", 1)[0]
    if not addr.startswith("ipv4:"):
        return ""
    return addr[len("ipv4:") :].rpartition(":")[0]


@dataclass(frozen=True)
class BulkRun:
    bytes: int
    seconds: float
    peer: str  # the address the sink saw the connection come from

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds


def parse_bulk(text: str) -> BulkRun:
    """``apps.py send``'s line; a transfer the sink did not confirm in full is an error."""
    try:
        r = json.loads(text)
    except ValueError:
        raise BenchError(f"bulk sender wrote no result: {text[:200]!r}") from None
    reply = str(r.get("reply", "")).split()
    if r.get("error") or len(reply) < 2 or reply[0] != "ok" or int(reply[1]) != r["bytes"]:
        raise BenchError(
            f"bulk transfer of {r.get('bytes')} bytes failed after {r.get('sent')} sent and "
            f"{r.get('seconds', 0):.1f}s: {r.get('error') or 'sink answered ' + repr(r['reply'])}"
        )
    peer = reply[2] if len(reply) > 2 else ""
    return BulkRun(bytes=int(r["bytes"]), seconds=float(r["seconds"]), peer=peer)
