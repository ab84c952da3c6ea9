"""Virtual time (``_client/retry.py`` ``VirtualTime``): the one clock of the fixtures' clients and
of every scenario run (docs/emulation.md, "Scenario runs: time, clocks and storage accounting").
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from pytest_cmg import VirtualTime

START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_waits_are_recorded_and_move_the_site_clock() -> None:
    time = VirtualTime(START)
    clock = time.site_clock()
    assert clock.now() == START
    time.sleep(15)
    time.pass_time(2.5)  # a stall: time passes, but it is not a retry wait
    assert time.clock() == 17.5
    assert time.waits == [15]
    assert clock.now() == START + timedelta(seconds=17.5)


def test_without_a_start_the_site_clock_starts_at_the_wall_clock() -> None:
    before = datetime.now(UTC)
    time = VirtualTime()
    assert before <= time.site_clock().now() <= datetime.now(UTC)
    time.pass_time(3600)
    assert time.site_clock().now() - time.start == timedelta(hours=1)


def test_actions_due_at_a_time_fire_once_when_time_reaches_them() -> None:
    time = VirtualTime(START)
    fired: list[tuple[str, float]] = []
    time.at(10, lambda: fired.append(("ten", time.now)))
    time.at(0, lambda: fired.append(("now", time.now)))  # already due: at once
    assert fired == [("now", 0.0)]
    time.pass_time(9.9)
    assert fired == [("now", 0.0)]
    time.sleep(0.2)
    time.sleep(50)
    assert fired == [("now", 0.0), ("ten", pytest.approx(10.1))]


def test_an_action_runs_outside_the_lock_and_may_move_time_itself() -> None:
    """A clock jump scheduled at a time passes time from inside ``pass_time``: it must not
    deadlock, and what it makes due runs too, each action once."""
    time = VirtualTime(START)
    fired: list[str] = []

    def jump() -> None:
        fired.append(f"jump at {time.clock():g}")
        time.pass_time(3600)

    time.at(30, jump)
    time.at(3000, lambda: fired.append(f"late at {time.clock():g}"))
    done = threading.Event()
    mover = threading.Thread(target=lambda: (time.sleep(31), done.set()), daemon=True)
    mover.start()
    assert done.wait(5.0), "an action run under the lock deadlocked the clock"
    assert fired == ["jump at 31", "late at 3631"]
    time.pass_time(10_000)
    assert len(fired) == 2
    assert time.waits == [31]


def test_the_retry_policy_is_seeded_so_backoff_repeats() -> None:
    first = VirtualTime(START, seed=7).policy()
    second = VirtualTime(START, seed=7).policy()
    other = VirtualTime(START, seed=8).policy()
    waits = [first.backoff(n) for n in (1, 2, 3)]
    assert waits == [second.backoff(n) for n in (1, 2, 3)]
    assert waits != [other.backoff(n) for n in (1, 2, 3)]


def test_the_policy_waits_on_this_time() -> None:
    time = VirtualTime(START)
    policy = time.policy(base_delay=2.0, jitter=0.0)
    policy.sleep(policy.backoff(2))
    assert (time.waits, policy.clock()) == ([4.0], 4.0)
