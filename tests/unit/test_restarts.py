"""The watcher's restart policy (medclear/stack/restarts.py), on a clock of our own."""

from __future__ import annotations

from medclear.stack.restarts import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    RESTARTS_PER_WINDOW_MAX,
    RestartPolicy,
)


def test_the_first_restart_waits_the_first_backoff() -> None:
    policy = RestartPolicy()
    assert not policy.seen_down(100.0)
    assert not policy.seen_down(100.0 + BACKOFF_FIRST_S / 2)
    assert policy.seen_down(100.0 + BACKOFF_FIRST_S)


def test_the_backoff_doubles_with_each_restart_in_a_row_up_to_the_cap() -> None:
    policy = RestartPolicy(per_window_max=100, window_s=10_000)
    now = 0.0
    waits = []
    for _ in range(8):
        waits.append(policy.backoff_s(now))
        policy.restarted(now)
        now += 1.0
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == BACKOFF_MAX_S


def test_it_gives_up_after_too_many_restarts_in_the_window_and_says_so_once() -> None:
    policy = RestartPolicy(backoff_first_s=0.0)
    for n in range(RESTARTS_PER_WINDOW_MAX):
        assert policy.seen_down(float(n))
        policy.restarted(float(n))
    assert not policy.seen_down(10.0)
    assert policy.gave_up
    assert not policy.seen_down(10_000.0)  # it stays given up: an operator acts


def test_restarts_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy(backoff_first_s=1.0, window_s=60.0)
    for t in (0.0, 10.0, 20.0):
        policy.restarted(t)
    assert policy.backoff_s(30.0) == 8.0
    assert policy.backoff_s(100.0) == 1.0  # an hour-old crash does not slow the next restart


def test_seen_up_clears_a_pending_backoff() -> None:
    policy = RestartPolicy()
    policy.seen_down(0.0)
    policy.seen_up()  # someone else restarted it
    assert not policy.seen_down(50.0)  # a new outage starts its own back-off
    assert policy.seen_down(50.0 + BACKOFF_FIRST_S)


def test_a_component_given_up_and_started_by_an_operator_is_watched_afresh() -> None:
    policy = RestartPolicy(backoff_first_s=0.0)
    for n in range(RESTARTS_PER_WINDOW_MAX):
        policy.seen_down(float(n))
        policy.restarted(float(n))
    assert not policy.seen_down(10.0) and policy.gave_up
    policy.seen_up()  # `medclear restart <name>`
    assert not policy.gave_up
    assert policy.seen_down(20.0)  # it exits again: restarted again
