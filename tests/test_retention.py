"""blktx.retention: which group snapshots a sanoid-style policy keeps."""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Iterator
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktx.retention import BUCKETS, Policy, describe, parse_keep_arg, parse_policy, select

UTC = datetime.UTC
HOUR = 3600.0


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime.datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def name(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, UTC).strftime("snap-%Y%m%dT%H%M")


def hourly_schedule(start: float, hours: int) -> list[tuple[str, float]]:
    return [(name(start + i * HOUR), start + i * HOUR) for i in range(hours)]


# 40 days of hourly snapshots: Monday 2026-10-19 00:00 (ISO week 43) .. Friday 2026-11-27 23:00 (week 48).
FORTY_DAYS = hourly_schedule(at(2026, 10, 19), 40 * 24)


def test_forty_days_hourly_keep_daily_7_weekly_4() -> None:
    kept = select(FORTY_DAYS, Policy(daily=7, weekly=4), tz=UTC)
    # the 23:00 snapshot of Nov 21..27, plus the Sundays closing weeks 46 and 45
    # (week 48's newest is Nov 27, week 47's is Nov 22: both already daily)
    assert len(kept) == 9
    assert sorted(kept) == sorted(
        [f"snap-202611{day:02d}T2300" for day in range(21, 28)] + ["snap-20261115T2300", "snap-20261108T2300"]
    )
    assert kept["snap-20261127T2300"] == ["daily 2026-11-27", "weekly 2026-W48"]
    assert kept["snap-20261122T2300"] == ["daily 2026-11-22", "weekly 2026-W47"]
    assert kept["snap-20261108T2300"] == ["weekly 2026-W45"]
    assert len(FORTY_DAYS) - len(kept) == 951  # pruned


def test_forty_days_hourly_full_policy() -> None:
    policy = parse_policy({"last": 3, "hourly": 24, "daily": 7, "weekly": 4, "monthly": 6})
    kept = select(FORTY_DAYS, policy, tz=UTC)
    # 24 hours of Nov 27, the last hour of Nov 21..26, Sundays Nov 15 and Nov 8,
    # October's newest (only two months have snapshots: both kept, not six)
    assert len(kept) == 24 + 6 + 2 + 1
    assert kept["snap-20261127T2300"] == [
        "last 1/3",
        "hourly 2026-11-27T23",
        "daily 2026-11-27",
        "weekly 2026-W48",
        "monthly 2026-11",
    ]
    assert kept["snap-20261127T2100"] == ["last 3/3", "hourly 2026-11-27T21"]
    assert kept["snap-20261127T0000"] == ["hourly 2026-11-27T00"]
    assert kept["snap-20261031T2300"] == ["monthly 2026-10"]
    assert sum(reason.startswith("weekly") for reasons in kept.values() for reason in reasons) == 4


def test_periods_without_snapshots_do_not_count() -> None:
    days = [1, 2, 3, 20, 21]  # a gap of 16 days
    snaps = [(f"d{day}", at(2026, 3, day, 12)) for day in days]
    assert set(select(snaps, Policy(daily=4), tz=UTC)) == {"d2", "d3", "d20", "d21"}
    assert set(select(snaps, Policy(daily=10), tz=UTC)) == {"d1", "d2", "d3", "d20", "d21"}


def test_newest_in_period_represents_it() -> None:
    snaps = [("morning", at(2026, 5, 4, 8)), ("evening", at(2026, 5, 4, 20)), ("noon", at(2026, 5, 4, 12))]
    assert select(snaps, Policy(daily=1), tz=UTC) == {"evening": ["daily 2026-05-04"]}
    assert select(snaps, Policy(last=2), tz=UTC) == {"evening": ["last 1/2"], "noon": ["last 2/2"]}


def test_ties_in_time_are_ordered_by_key() -> None:
    when = at(2026, 1, 1)
    snaps = [("b", when), ("c", when), ("a", when)]
    assert select(snaps, Policy(last=1), tz=UTC) == {"c": ["last 1/1"]}
    assert select(snaps, Policy(last=2, yearly=1), tz=UTC) == {"c": ["last 1/2", "yearly 2026"], "b": ["last 2/2"]}
    assert select(list(reversed(snaps)), Policy(last=2, yearly=1), tz=UTC) == select(snaps, Policy(last=2, yearly=1), tz=UTC)


def test_reason_formats_and_iso_week_year() -> None:
    snaps = [("new-year", at(2027, 1, 1, 13, 45))]  # Friday of ISO week 2026-W53
    policy = Policy(last=1, hourly=1, daily=1, weekly=1, monthly=1, yearly=1)
    assert select(snaps, policy, tz=UTC) == {
        "new-year": ["last 1/1", "hourly 2027-01-01T13", "daily 2027-01-01", "weekly 2026-W53", "monthly 2027-01", "yearly 2027"]
    }


def test_tz_moves_period_boundaries() -> None:
    snaps = [("late", at(2026, 11, 27, 3))]
    assert select(snaps, Policy(daily=1), tz=UTC) == {"late": ["daily 2026-11-27"]}
    minus5 = datetime.timezone(datetime.timedelta(hours=-5))
    assert select(snaps, Policy(daily=1), tz=minus5) == {"late": ["daily 2026-11-26"]}


def test_dst_fall_back_hour_is_two_real_hours() -> None:
    """The hour that repeats when clocks go back is two hours of snapshots: hourly = 4
    keeps the 4 taken an hour apart (one per real hour), not 3."""
    berlin = ZoneInfo("Europe/Berlin")  # 2026-10-25 03:00 CEST -> 02:00 CET
    snaps = [(f"s{i}", at(2026, 10, 24, 23, 30) + i * HOUR) for i in range(4)]  # 01:30, 02:30, 02:30, 03:30 local
    kept = select(snaps, Policy(hourly=4), tz=berlin)
    assert kept == {
        "s3": ["hourly 2026-10-25T03"],
        "s2": ["hourly 2026-10-25T02"],
        "s1": ["hourly 2026-10-25T02"],
        "s0": ["hourly 2026-10-25T01"],
    }
    assert select(snaps, Policy(daily=1), tz=berlin) == {"s3": ["daily 2026-10-25"]}, "still one day"


@pytest.fixture
def new_york_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not hasattr(time, "tzset"):
        pytest.skip("no time.tzset")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_local_time_by_default(new_york_local_time: None) -> None:
    snaps = [("late", at(2026, 11, 27, 3)), ("summer", at(2026, 7, 1, 3))]
    assert select(snaps, Policy(daily=2)) == {"late": ["daily 2026-11-26"], "summer": ["daily 2026-06-30"]}


def test_empty_policy_keeps_nothing() -> None:
    assert Policy().empty()
    assert parse_policy({}).empty()
    assert parse_keep_arg("daily=0").empty()
    assert not Policy(yearly=1).empty()
    assert select(FORTY_DAYS, Policy(), tz=UTC) == {}
    assert describe(Policy()) == "nothing"


def test_no_snapshots() -> None:
    assert select([], Policy(last=3, daily=7)) == {}


def test_select_refuses_duplicate_keys_and_bad_times() -> None:
    with pytest.raises(ValueError, match="more than once: a"):
        select([("a", 1.0), ("b", 2.0), ("a", 3.0)], Policy(last=1))
    with pytest.raises(ValueError, match="'a' has no usable time nan"):
        select([("a", float("nan"))], Policy(last=1))
    with pytest.raises(ValueError, match="'a' has no usable time inf"):
        select([("a", float("inf"))], Policy(daily=1))


def test_parse_policy_and_keep_arg() -> None:
    expected = Policy(last=3, daily=7, weekly=4)
    assert parse_policy({"last": 3, "daily": 7, "weekly": 4}) == expected
    assert parse_keep_arg("last=3,daily=7,weekly=4") == expected
    assert parse_keep_arg(" last = 3 , daily=7,weekly=4 ") == expected
    assert describe(expected) == "last=3, daily=7, weekly=4"
    assert describe(parse_keep_arg("yearly=1,hourly=2")) == "hourly=2, yearly=1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"dayly": 7}, "unknown retention bucket 'dayly': did you mean 'daily'?"),
        ({"Weekly": 7}, "did you mean 'weekly'?"),
        ({"forever": 1}, "unknown retention bucket 'forever': known buckets: last, hourly, daily, weekly, monthly, yearly"),
        ({1: 1}, "unknown retention bucket '1'"),
        ({"daily": True}, "retention count 'daily' must be a non-negative integer, got bool True"),
        ({"daily": 7.0}, "got float 7.0"),
        ({"daily": "7"}, "got str '7'"),
        ({"last": -1}, "retention count 'last' must be a non-negative integer, got int -1"),
        ([("daily", 7)], "a retention policy must be a table like {last = 3, daily = 7}, got list"),
        ("daily=7", "must be a table"),
        (None, "must be a table"),
    ],
)
def test_parse_policy_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_policy(value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "an empty retention policy"),
        ("  ", "an empty retention policy"),
        ("dayly=7", "unknown retention bucket 'dayly': did you mean 'daily'?"),
        ("daily=x", "retention count 'daily' must be a non-negative integer, got str 'x'"),
        ("daily=-1", "got int -1"),
        ("daily=1.5", "got str '1.5'"),
        ("daily=", "got str ''"),
        ("daily", "retention item 'daily' is not BUCKET=COUNT"),
        ("=3", "is not BUCKET=COUNT"),
        ("last=3,", "retention item '' is not BUCKET=COUNT"),
        ("daily=1,daily=2", "retention bucket 'daily' is given twice"),
    ],
)
def test_parse_keep_arg_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_keep_arg(text)
    assert message in str(caught.value)


def test_policy_checks_its_counts() -> None:
    with pytest.raises(ValueError, match="'hourly' must be a non-negative integer"):
        Policy(hourly=-2)
    with pytest.raises(ValueError, match="unknown retention bucket 'dayly'"):
        Policy().count("dayly")
    assert tuple(field.name for field in dataclasses.fields(Policy)) == BUCKETS


# --- properties against an independent reference model -----------------------------------------

LABELS = {"hourly": "%Y-%m-%dT%H", "daily": "%Y-%m-%d", "weekly": "%G-W%V", "monthly": "%Y-%m", "yearly": "%Y"}


def reference(snaps: list[tuple[str, float]], policy: Policy) -> dict[str, list[str]]:
    """Group every snapshot into its periods, pick each period's newest, keep the newest N periods."""
    rank = {key: position for position, (key, _) in enumerate(sorted(snaps, key=lambda snap: (snap[1], snap[0])))}
    reasons: dict[str, list[str]] = {key: [] for key, _ in snaps}
    for position, key in enumerate(sorted(rank, key=rank.__getitem__, reverse=True)):
        if position < policy.last:
            reasons[key].append(f"last {position + 1}/{policy.last}")
    for bucket, label in LABELS.items():
        newest: dict[str, str] = {}
        for key, when in snaps:
            period = datetime.datetime.fromtimestamp(when, UTC).strftime(label)
            if period not in newest or rank[key] > rank[newest[period]]:
                newest[period] = key
        chosen = sorted(newest.items(), key=lambda item: rank[item[1]], reverse=True)[: getattr(policy, bucket)]
        for period, key in chosen:
            reasons[key].append(f"{bucket} {period}")
    return {key: found for key, found in reasons.items() if found}


START, END = at(2022, 1, 1), at(2026, 12, 31)
times = st.one_of(
    st.floats(min_value=START, max_value=END),
    st.integers(min_value=0, max_value=3 * 24 * 70).map(lambda hours: at(2025, 12, 1) + hours * HOUR),  # ties and boundaries
)
snapshot_lists = st.lists(st.tuples(st.text("abcxyz019", min_size=1, max_size=4), times), max_size=60, unique_by=lambda s: s[0])
counts = st.integers(min_value=0, max_value=8)
policies = st.builds(Policy, last=counts, hourly=counts, daily=counts, weekly=counts, monthly=counts, yearly=counts)


@settings(deadline=None)
@given(snapshot_lists, policies)
def test_select_matches_reference(snaps: list[tuple[str, float]], policy: Policy) -> None:
    assert select(snaps, policy, tz=UTC) == reference(snaps, policy)


@settings(deadline=None)
@given(snapshot_lists, policies, st.sampled_from(BUCKETS), st.integers(min_value=1, max_value=10))
def test_raising_a_count_never_removes_a_kept_snapshot(
    snaps: list[tuple[str, float]], policy: Policy, bucket: str, more: int
) -> None:
    raised = dataclasses.replace(policy, **{bucket: policy.count(bucket) + more})
    assert set(select(snaps, policy, tz=UTC)) <= set(select(snaps, raised, tz=UTC))


@settings(deadline=None)
@given(snapshot_lists, policies)
def test_last_len_keeps_everything(snaps: list[tuple[str, float]], policy: Policy) -> None:
    kept = select(snaps, dataclasses.replace(policy, last=len(snaps)), tz=UTC)
    assert set(kept) == {key for key, _ in snaps}


@settings(deadline=None)
@given(snapshot_lists, policies, st.data())
def test_input_order_does_not_matter_and_buckets_keep_at_most_n(
    snaps: list[tuple[str, float]], policy: Policy, data: st.DataObject
) -> None:
    kept = select(snaps, policy, tz=UTC)
    assert select(data.draw(st.permutations(snaps)), policy, tz=UTC) == kept
    for bucket in BUCKETS:
        assert sum(reason.split()[0] == bucket for reasons in kept.values() for reason in reasons) <= policy.count(bucket)
