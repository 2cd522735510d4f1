"""``metadata.rbees_window`` of an OpenAI batch: when its lines may be submitted."""

from __future__ import annotations

import datetime

import pytest

from rbees_core.programs.orcd_batch_runner import in_window, parse_window


def at(hour: int, minute: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 1, 1, hour, minute)


def test_a_window_across_midnight() -> None:
    assert parse_window("22:00-07:00") == (22 * 60, 7 * 60)
    assert in_window("22:00-07:00", at(23)) and in_window("22:00-07:00", at(6, 59))
    assert not in_window("22:00-07:00", at(7)) and not in_window("22:00-07:00", at(12))


def test_a_window_within_a_day_and_none() -> None:
    assert in_window("09:30-17:00", at(9, 30)) and not in_window("09:30-17:00", at(17))
    assert in_window(None, at(3)) and in_window("", at(3))


@pytest.mark.parametrize("text", ["22-07", "24:00-01:00", "10:60-11:00", "night", ""])
def test_a_malformed_window_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_window(text)
