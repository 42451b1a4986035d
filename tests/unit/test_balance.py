"""P2C peak-EWMA with an injected clock and a seeded random source: exact, deterministic."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from nodemesh.errors import NoEndpoints
from nodemesh.outbound.balance import DECAY, DEFAULT_RTT, FAILURE_PENALTY, PENALTY, Balancer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer(*endpoints: str, seed: int = 7) -> tuple[Balancer[str], Clock]:
    clock = Clock()
    b: Balancer[str] = Balancer("web", clock=clock, rng=random.Random(seed))
    b.update(list(endpoints))
    return b, clock


def warm(b: Balancer[str], clock: Clock, rtts: dict[str, float]) -> None:
    """Set each endpoint's estimate to ``rtt`` with one answer: the first replaces the guess."""
    for e, rtt in rtts.items():
        b._stats[e].pending += 1  # as if picked; ``pick`` cannot be aimed at one endpoint
        b.done(e, rtt)
        assert b._stats[e].estimate == pytest.approx(rtt)


def test_no_endpoints() -> None:
    b, _ = balancer()
    with pytest.raises(NoEndpoints) as info:
        b.pick()
    assert info.value.status == 503
    assert "web" in str(info.value)
    b.update(["a"])
    b.update([])
    with pytest.raises(NoEndpoints):
        b.pick()


def test_one_endpoint_is_always_picked_and_counts_pending() -> None:
    b, _ = balancer("a")
    assert [b.pick() for _ in range(3)] == ["a", "a", "a"]
    assert b._stats["a"].pending == 3
    assert b.cost("a") == PENALTY + 3  # never answered, three in flight
    for _ in range(3):
        b.done("a", 0.01)
    assert b._stats["a"].pending == 0
    assert repr(b) == "<Balancer web endpoints=1>"


def test_new_idle_endpoint_costs_nothing_so_it_is_probed_at_once() -> None:
    b, clock = balancer("old", "new")
    warm(b, clock, {"old": 0.001})
    assert b.cost("new") == 0.0
    assert b.pick() == "new"  # cheaper than any endpoint with history
    assert b.cost("new") == PENALTY + 1  # no answer yet: not flooded
    assert b.pick() == "old"


def test_the_first_answer_replaces_the_placeholder_outright() -> None:
    b, _ = balancer("a")
    b.pick()
    b.done("a", 0.001)  # faster than DEFAULT_RTT and at once: still taken as is
    assert b.cost("a") == pytest.approx(0.001)
    assert DEFAULT_RTT == 0.030


def test_peak_is_taken_at_once() -> None:
    b, clock = balancer("a")
    warm(b, clock, {"a": 0.010})
    assert b.cost("a") == pytest.approx(0.010)
    b.pick()
    b.done("a", 0.500)  # one slow answer: the estimate jumps, no averaging
    assert b.cost("a") == pytest.approx(0.500)


def test_estimate_decays_toward_the_observed_rtt() -> None:
    b, clock = balancer("a")
    warm(b, clock, {"a": 1.0})
    clock.now += DECAY  # one time constant later, a fast answer
    b.pick()  # with one endpoint, pick reads no cost, so nothing decays before ``done``
    b.done("a", 0.1)
    w = math.exp(-1.0)
    assert b.cost("a") == pytest.approx(1.0 * w + 0.1 * (1 - w))
    # Many fast answers close together pull it down only slowly: the weight is per elapsed time.
    for _ in range(10):
        clock.now += 0.001
        b.pick()
        b.done("a", 0.1)
    assert 0.1 < b.cost("a") < 1.0 * w + 0.1 * (1 - w)


def test_reading_the_cost_decays_toward_zero() -> None:
    b, clock = balancer("a")
    warm(b, clock, {"a": 2.0})
    clock.now += DECAY
    assert b.cost("a") == pytest.approx(2.0 * math.exp(-1.0))
    clock.now += 3 * DECAY
    assert b.cost("a") == pytest.approx(2.0 * math.exp(-4.0))


def test_pending_requests_multiply_the_cost() -> None:
    b, clock = balancer("a")
    warm(b, clock, {"a": 0.2})
    b.pick()
    b.pick()
    assert b.cost("a") == pytest.approx(0.2 * 3)


def test_unknown_endpoint_with_a_request_in_flight_is_penalised() -> None:
    b, clock = balancer("slow", "new")
    warm(b, clock, {"slow": 5.0})
    b._stats["new"].pending = 1  # picked once, no answer yet
    assert b.cost("new") == PENALTY + 1
    # Even a 5-second endpoint is preferred until the new one has answered once.
    assert {b.pick() for _ in range(20)} == {"slow"}
    for _ in range(20):
        b.done("slow", 5.0)
    b.done("new", 0.01)
    assert b.pick() == "new"


def test_failure_counts_at_least_the_failure_penalty() -> None:
    b, _ = balancer("a")
    b.pick()
    b.done("a", 0.001, failed=True)  # failed fast: must not look fast
    assert b.cost("a") == pytest.approx(FAILURE_PENALTY)
    b.pick()
    b.done("a", 3.0, failed=True)  # failed slowly: the real RTT when larger
    assert b.cost("a") == pytest.approx(3.0)


def test_a_fast_failing_endpoint_loses_to_a_slow_healthy_one() -> None:
    b, clock = balancer("flaky", "steady")
    warm(b, clock, {"steady": 0.2})
    b._stats["flaky"].pending += 1
    b.done("flaky", 0.0005, failed=True)
    for _ in range(10):
        assert b.pick() == "steady"
        b.done("steady", 0.2)


def test_update_keeps_the_stats_of_endpoints_that_stay() -> None:
    b, clock = balancer("a", "b")
    warm(b, clock, {"a": 0.25, "b": 0.5})
    b.pick()
    stats_a = b._stats["a"]
    source = ["a", "c"]
    b.update(source)
    assert b.source is source
    assert b.endpoints == ("a", "c")
    assert b._stats["a"] is stats_a
    assert not b._stats["c"].seen
    assert b.cost("c") == 0.0
    assert "b" not in b._stats  # left with nothing in flight: forgotten
    b.update(["a", "b"])
    assert not b._stats["b"].seen  # came back: starts over
    assert b._stats["a"].estimate == pytest.approx(0.25)


def test_endpoint_removed_while_pending() -> None:
    b, _ = balancer("a")
    assert b.pick() == "a"
    b.update(["b"])
    assert b.endpoints == ("b",)
    assert b._stats["a"].pending == 1  # kept until its answer arrives
    assert {b.pick() for _ in range(5)} == {"b"}
    b.done("a", 0.01)
    assert "a" not in b._stats
    b.done("a", 0.01)  # a second, stray ``done`` is harmless
    assert "a" not in b._stats


def test_endpoint_removed_and_readded_while_pending_keeps_its_stats() -> None:
    b, clock = balancer("a", "b")
    warm(b, clock, {"a": 0.4})
    b._stats["a"].pending += 1
    stats_a = b._stats["a"]
    b.update(["b"])
    b.update(["a", "b"])
    assert b._stats["a"] is stats_a
    assert b._stats["a"].pending == 1


def test_done_for_an_unknown_endpoint_is_ignored() -> None:
    b, _ = balancer("a")
    b.done("zzz", 1.0)
    assert set(b._stats) == {"a"}


def test_equal_endpoints_share_the_traffic() -> None:
    b, clock = balancer("a", "b", "c", seed=1)
    warm(b, clock, {"a": 0.01, "b": 0.01, "c": 0.01})
    counts: Counter[str] = Counter()
    for _ in range(3000):
        e = b.pick()
        counts[e] += 1
        b.done(e, 0.01)
    assert all(800 < counts[e] < 1200 for e in "abc"), counts


def test_the_worst_of_three_is_never_chosen() -> None:
    # Two distinct draws per pick: the most expensive endpoint loses every comparison.
    b, clock = balancer("a", "b", "c", seed=3)
    warm(b, clock, {"a": 0.01, "b": 0.02, "c": 0.5})
    counts: Counter[str] = Counter()
    for _ in range(300):
        e = b.pick()
        counts[e] += 1
        b.done(e, {"a": 0.01, "b": 0.02, "c": 0.5}[e])
    assert counts["c"] == 0
    assert counts["a"] > counts["b"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_slow_endpoint_gets_less_traffic_over_1000_picks(seed: int) -> None:
    rtt = {"fast1": 0.005, "fast2": 0.005, "fast3": 0.008, "slow": 0.250}
    b, clock = balancer(*rtt, seed=seed)
    counts: Counter[str] = Counter()
    for _ in range(1000):
        e = b.pick()
        counts[e] += 1
        clock.now += rtt[e]
        b.done(e, rtt[e])
        clock.now += 0.001
    assert sum(counts.values()) == 1000
    assert counts["slow"] < 20, counts  # its first answer made it expensive at once
    assert min(counts["fast1"], counts["fast2"], counts["fast3"]) > 150, counts


def test_requests_in_flight_spread_the_load() -> None:
    # Nothing answers: the pending count alone must spread picks instead of piling on one.
    b, clock = balancer("a", "b", "c", "d", seed=5)
    warm(b, clock, dict.fromkeys("abcd", 0.01))
    counts = Counter(b.pick() for _ in range(400))
    assert max(counts.values()) - min(counts.values()) <= 40, counts


def test_same_seed_same_choices() -> None:
    def run() -> list[str]:
        b, _ = balancer("a", "b", "c", seed=42)
        out = []
        for i in range(50):
            e = b.pick()
            out.append(e)
            b.done(e, 0.001 * (1 + i % 7))
        return out

    assert run() == run()
