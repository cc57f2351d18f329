"""The login throttle (api/base.py `LoginThrottle`): its memory stays within its bound
whatever the number of failing addresses and user names, a key under attack keeps its
count while a flood of other keys passes, quiet keys are forgotten, and the delays are
those the login route documents (three free failures, then 0.25 s doubling up to 8 s)."""

from __future__ import annotations

import sys
import time

import pytest

from api.base import LoginThrottle, api_settings

BOUND = 10_000


def test_a_hundred_thousand_failing_addresses_and_users_stay_within_the_bound() -> None:
    throttle = LoginThrottle(max_entries=BOUND)
    peak = 0
    for n in range(100_000):
        throttle.failed(f"user:guess{n}", f"addr:10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        peak = max(peak, len(throttle))
    assert peak == BOUND and len(throttle) == BOUND
    # the newest are kept (and still counted), the oldest went first
    assert throttle._failures.get("user:guess99999") is not None
    assert throttle._failures.get("user:guess0") is None
    # and the memory it holds is that of BOUND entries, not of 200,000 keys
    held = sys.getsizeof(throttle._failures) + sum(
        sys.getsizeof(k) + sys.getsizeof(v) for k, v in throttle._failures.items())
    assert held < BOUND * 400, held


def test_a_key_under_attack_keeps_its_count_through_a_flood() -> None:
    throttle = LoginThrottle(max_entries=BOUND)
    for n in range(100_000):
        if n % 1000 == 0:  # the attacker's attempts between the flood's
            throttle.failed("user:admin", "addr:203.0.113.9")
        throttle.failed(f"user:noise{n}")
    assert len(throttle) == BOUND
    assert throttle.delay("user:admin") == throttle.cap_seconds  # 100 failures: capped
    assert throttle.delay("addr:203.0.113.9") == throttle.cap_seconds
    assert throttle.delay("user:noise0") == 0.0  # pushed out long ago: forgotten


def test_delays_double_after_three_free_failures_and_a_success_forgives() -> None:
    throttle = LoginThrottle(max_entries=100)
    waits = []
    for _ in range(9):
        waits.append(throttle.delay("user:u", "addr:a"))
        throttle.failed("user:u", "addr:a")
    assert waits == [0, 0, 0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert throttle.delay("addr:a", "user:other") == 8.0  # the worst key counts
    throttle.succeeded("user:u", "addr:a")
    assert throttle.delay("user:u", "addr:a") == 0.0 and len(throttle) == 0


def test_quiet_keys_are_dropped_as_new_failures_come() -> None:
    throttle = LoginThrottle(max_entries=BOUND)
    throttle.forget_after = 0.05
    for n in range(100):
        throttle.failed(f"addr:old{n}")
    time.sleep(0.1)
    assert throttle.delay("addr:old1") == 0.0  # forgotten, by time
    throttle.failed("addr:new")
    assert len(throttle) == 1  # and gone from memory at the next failure


@pytest.mark.parametrize("bad", [0, -1, "10", None, True, 1.5])
def test_bad_api_settings_stop_nanod_with_the_setting_named(bad: object) -> None:
    good = {"max_json_bytes": 1 << 20, "password_workers": 2, "login_throttle_entries": 10,
            "store_workers": 8}
    assert api_settings({"api": good}) == good
    for name in good:
        with pytest.raises(ValueError, match=f"api.{name}"):
            api_settings({"api": {**good, name: bad}})
    with pytest.raises(ValueError, match="at least 1"):
        LoginThrottle(max_entries=0)
