"""The shared rules of vdsm_agent/common: clock, page tokens, supervision, backoff."""

from __future__ import annotations

import asyncio
import datetime
import logging
import random

import pytest

from vdsm_agent import errors
from vdsm_agent.common import clock, paging, supervision
from vdsm_agent.common.backoff import Backoff

# -- clock -----------------------------------------------------------------------------------


def test_milliseconds_match_isoformat() -> None:
    """The connection timestamps (3 digits) are what datetime's isoformat gave."""
    rng = random.Random(11)
    edges = [0.0, 0.0005, 0.9995, 0.9999995, 1700000000.1234, 1700000000.9996]
    for timestamp in edges + [rng.uniform(0, 4e9) for _ in range(20000)]:
        expected = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        assert clock.rfc3339(timestamp, 3) == expected, timestamp
    assert clock.rfc3339(None, 3) is None


def test_a_param_that_is_no_timestamp_names_its_field() -> None:
    assert clock.parse_param("2025-01-01T00:00:00Z", "params.deadline") == 1735689600.0
    with pytest.raises(errors.InvalidParams) as caught:
        clock.parse_param("2025-01-01T00:00:00", "params.filter.createdAfter")
    assert caught.value.data == {"field": "params.filter.createdAfter", "rule": "format"}
    assert caught.value.detail.startswith("createdAfter: ")


# -- page tokens ------------------------------------------------------------------------------


def test_a_token_carries_its_key_and_its_filter() -> None:
    where = {"state": ["done"], "host": "h1"}
    digest = paging.fingerprint(where)
    assert digest == paging.fingerprint({"host": "h1", "state": ["done"]})  # key order
    token = paging.encode_token([1.5, "h1", "t"], digest)
    assert paging.decode_token(token, digest, "listTasks", (float, str, str)) == (
        1.5, "h1", "t")


@pytest.mark.parametrize("token", [
    "garbage!", "", "W10", paging.encode_token([1.5, "x"], "another-filter"),
    paging.encode_token(["not a number", "x"], paging.fingerprint({})),
    paging.encode_token([1.5], paging.fingerprint({})),
    paging.encode_token([1.5, "x", "y"], paging.fingerprint({})),
])
def test_anything_but_a_token_of_this_list_and_filter_is_invalid_params(token: str) -> None:
    """Also a token whose key has the wrong shape: the engine used to convert the key
    after the check, and a crafted one was an internal error."""
    with pytest.raises(errors.InvalidParams) as caught:
        paging.decode_token(token, paging.fingerprint({}), "listJobs", (float, str))
    assert caught.value.data["field"] == "params.pageToken"
    assert "listJobs" in caught.value.detail


# -- supervision ----------------------------------------------------------------------------


async def test_a_loop_that_fails_is_logged_and_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    rounds: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        rounds.append(len(rounds))
        if len(rounds) < 3:
            raise RuntimeError("a bug")
        done.set()

    background = supervision.Background("owner", logging.getLogger("test.supervision"))
    with caplog.at_level(logging.ERROR, logger="test.supervision"):
        background.loop(flaky, "flaky loop", restart_delay=0.01)
        await asyncio.wait_for(done.wait(), 5)
    assert rounds == [0, 1, 2]
    failures = [r.getMessage() for r in caplog.records if r.name == "test.supervision"]
    assert failures == ["owner: flaky loop failed; restarting it"] * 2
    await background.close()
    assert not background


async def test_close_cancels_loops_and_jobs(caplog: pytest.LogCaptureFixture) -> None:
    background = supervision.Background("owner", logging.getLogger("test.supervision"))
    started = asyncio.Event()
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def failing() -> None:
        raise ValueError("job bug")

    background.loop(lambda: forever("loop"), "loop", restart_delay=1.0)
    background.start(forever("job"))
    with caplog.at_level(logging.ERROR, logger="test.supervision"):
        background.start(failing())
        await started.wait()
        await asyncio.sleep(0.01)
    assert "owner: background job failed" in caplog.text
    assert background
    await background.close()
    assert sorted(cancelled) == ["job", "loop"]
    assert not background


# -- backoff ----------------------------------------------------------------------------------


def test_engine_style_backoff_starts_at_the_interval_and_is_jittered() -> None:
    """The engine's host workers: the floor is retry_interval, the cap retry_max."""
    policy = Backoff(base=2.0, cap=30.0, floor=2.0)
    rng = random.Random(5)
    assert {policy.delay(0, rng) for _ in range(50)} == {2.0}  # the first retry
    later = [policy.delay(4, rng) for _ in range(200)]
    assert all(2.0 <= delay <= 30.0 for delay in later)
    assert len({round(delay, 3) for delay in later}) > 50  # not a fixed ladder
