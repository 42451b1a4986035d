"""The recorder's own counts index and fold against hdrh's ``record_value``, bit for bit.

``Recorder.request`` never calls ``record_value``: it computes hdrh's counts index itself and
counts into a sparse dict that ``cut`` folds into a histogram.  Every test here compares that
path with a plain HdrHistogram fed the same clamped values, through hdrh's public readings:
the V2 encoding, counts, total, min, max, mean and percentiles.
"""

from __future__ import annotations

import math
import random

import pytest
from hdrh.histogram import HdrHistogram

from nodemesh.errors import NodemeshError
from nodemesh.telemetry import metrics
from nodemesh.telemetry.metrics import (
    HIGHEST_US,
    LOWEST_US,
    Recorder,
    add_sparse,
    clamp_us,
    counts_index,
    histogram_of,
    new_histogram,
)

PERCENTILES = [0.0, 0.1, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0]
REF = new_histogram()


def random_seconds(rng: random.Random, n: int) -> list[float]:
    """Log-uniform from 10 ns to 1,000 s: below, across and above the histograms' range."""
    return [math.exp(rng.uniform(math.log(1e-8), math.log(1e3))) for _ in range(n)]


def truth(seconds: list[float]) -> HdrHistogram:
    """What the recorder did before: ``record_value`` of each clamped latency."""
    return truth_us([min(max(int(s * 1_000_000), LOWEST_US), HIGHEST_US) for s in seconds])


def truth_us(values: list[int]) -> HdrHistogram:
    h = new_histogram()
    for v in values:
        assert h.record_value(v)
    return h


def assert_same(got: HdrHistogram, want: HdrHistogram) -> None:
    assert got.encode() == want.encode()
    assert list(got.counts) == list(want.counts)
    assert got.get_total_count() == want.get_total_count()
    assert got.get_min_value() == want.get_min_value()
    assert got.get_max_value() == want.get_max_value()
    assert got.get_mean_value() == want.get_mean_value()
    assert got.get_percentile_to_value_dict(PERCENTILES) == want.get_percentile_to_value_dict(
        PERCENTILES
    )
    for p in (0.0, 50.0, 99.9, 100.0):  # the one-percentile path /stats.json takes
        assert got.get_value_at_percentile(p) == want.get_value_at_percentile(p)
    assert got.equals(want)


def only_series(rec: Recorder) -> metrics.Series:
    (s,) = list(rec.series())
    return s


@pytest.fixture(params=["bucket by bucket", "whole arrays"])
def past_adds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with every cut adding its interval into the past each way."""
    below = 10**9 if request.param == "bucket by bucket" else 0
    monkeypatch.setattr(metrics, "ADD_SPARSE_BELOW", below)


# --- the index -----------------------------------------------------------------------------


def test_counts_index_is_hdrhs_for_every_value_up_to_70000() -> None:
    for v in range(70_001):
        assert counts_index(v) == REF._counts_index_for(v), v


def test_counts_index_is_hdrhs_at_every_bucket_edge_and_at_random() -> None:
    edges = {(1 << k) + d for k in range(27) for d in (-1, 0, 1)} | {HIGHEST_US - 1, HIGHEST_US}
    rng = random.Random(7)
    values = sorted(edges) + [rng.randint(1, HIGHEST_US) for _ in range(100_000)]
    for v in values:
        assert counts_index(v) == REF._counts_index_for(v), v
    assert counts_index(HIGHEST_US) < REF.counts_len


@pytest.mark.parametrize(
    ("seconds", "us"),
    [(-1.0, 1), (0.0, 1), (4e-7, 1), (1e-6, 1), (2.5e-6, 2), (60.0, HIGHEST_US), (1e4, HIGHEST_US)],
)
def test_latencies_clamp_to_the_range_as_before(seconds: float, us: int) -> None:
    assert clamp_us(seconds) == us


def test_values_beyond_the_range_land_where_record_value_put_them() -> None:
    rng = random.Random(3)
    seconds = [rng.uniform(60.0, 1e5) for _ in range(1000)] + [rng.uniform(-1, 1e-6)]
    rec = Recorder()
    for s in seconds:
        rec.request("inbound", "web", "shop", 200, s)
    (cut,) = rec.cut()
    assert_same(cut.latency, truth(seconds))


def test_the_layout_is_checked_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "new_histogram", lambda: HdrHistogram(2, HIGHEST_US, 3))
    with pytest.raises(NodemeshError, match="unit_magnitude=1"):
        metrics._index_constants()


# --- the fold ------------------------------------------------------------------------------


def test_one_value_at_each_bucket_edge_folds_like_record_value() -> None:
    # The fold derives min and max from indexes; hdrh keeps the raw values.  At a bucket's
    # first and last value, and one past, the readings must still agree.
    for k in range(1, 27):
        for v in ((1 << k) - 1, 1 << k, (1 << k) + 1, (3 << k) // 2):
            v = min(v, HIGHEST_US)
            assert_same(histogram_of({counts_index(v): 1}), truth_us([v]))


def test_an_empty_fold_is_an_empty_histogram() -> None:
    assert_same(histogram_of({}), new_histogram())


@pytest.mark.parametrize("seed", range(4))
def test_a_cut_is_byte_identical_to_record_value(seed: int) -> None:
    rng = random.Random(seed)
    seconds = random_seconds(rng, 20_000)
    rec = Recorder()
    for s in seconds:
        rec.request("outbound", "web", "shop", 200, s, "GET /", "h1")
    (cut,) = rec.cut()
    assert cut.count == len(seconds)
    assert_same(cut.latency, truth(seconds))


@pytest.mark.usefixtures("past_adds")
def test_cut_after_cut_stays_right_and_latency_is_the_running_truth() -> None:
    rng = random.Random(11)
    # Busy, single-value, one-bucket, idle, extremes-only and ordinary intervals.
    intervals = [
        random_seconds(rng, 5000),
        [0.0123],
        [2e-3] * 50,
        [],
        [1e-9, 1e9, 1e-9],
        random_seconds(rng, 300),
    ]
    rec = Recorder()
    seen: list[float] = []
    for interval in intervals:
        for s in interval:
            rec.request("inbound", "web", "shop", 503, s)
        cuts = rec.cut()
        if not interval:
            assert cuts == []
            continue
        (cut,) = cuts
        assert cut.count == len(interval)
        assert_same(cut.latency, truth(interval))
        seen += interval
        s = only_series(rec)
        assert s.count == len(seen) and s.interval_count == 0
        assert_same(s.latency, truth(seen))
    assert rec.cut() == []


@pytest.mark.usefixtures("past_adds")
def test_latency_mid_interval_is_past_plus_the_open_interval() -> None:
    rng = random.Random(5)
    rec = Recorder()
    first, second = random_seconds(rng, 3000), random_seconds(rng, 700)
    for s in first:
        rec.request("inbound", "web", "shop", 200, s)
    s = only_series(rec)
    assert s.interval_count == 3000
    assert_same(s.latency, truth(first))  # nothing cut yet
    rec.cut()
    for x in second:
        rec.request("inbound", "web", "shop", 200, x)
    assert s.interval_count == 700
    assert_same(s.latency, truth(first + second))
    # Reading it changes nothing: the next cut holds the open interval only.
    (cut,) = rec.cut()
    assert_same(cut.latency, truth(second))


@pytest.mark.usefixtures("past_adds")
def test_a_fast_past_keeps_its_min_under_a_slow_interval() -> None:
    rec = Recorder()
    rec.request("inbound", "web", "shop", 200, 0.000_005)
    rec.cut()
    rec.request("inbound", "web", "shop", 200, 3.0)
    assert only_series(rec).latency.get_min_value() == 5
    rec.cut()
    assert only_series(rec).latency.get_min_value() == 5


def test_adding_an_interval_either_way_equals_recording_both_into_one() -> None:
    rng = random.Random(9)
    a, b = random_seconds(rng, 2000), random_seconds(rng, 10)
    # The recorder adds only intervals that saw requests: hdrh's add of an empty histogram
    # would set the min to 0.
    for left, right in ((a, b), (b, a), ([], a)):
        into = truth(left)
        into.add(truth(right))
        assert_same(into, truth(left + right))
        counts: dict[int, int] = {}
        for us in (clamp_us(x) for x in right):
            counts[counts_index(us)] = counts.get(counts_index(us), 0) + 1
        into = truth(left)
        add_sparse(into, counts, histogram_of(counts))
        assert_same(into, truth(left + right))


def test_series_across_labels_each_match_their_own_truth() -> None:
    rng = random.Random(2)
    rec = Recorder()
    want: dict[tuple[str, str], list[float]] = {}
    for _ in range(20_000):
        service = rng.choice(("web", "cart", "auth"))
        status = rng.choice((0, 101, 200, 302, 404, 503, 700))
        seconds = math.exp(rng.uniform(math.log(1e-6), math.log(5.0)))
        rec.request("outbound", service, "shop", status, seconds)
        cls = "error" if not 100 <= status < 600 else f"{status // 100}xx"
        want.setdefault((service, cls), []).append(seconds)
    cuts = rec.cut()
    assert {(c.service, c.status) for c in cuts} == set(want)
    for c in cuts:
        assert c.count == len(want[c.service, c.status])
        assert_same(c.latency, truth(want[c.service, c.status]))
