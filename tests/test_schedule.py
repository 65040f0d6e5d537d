"""Maintenance windows and caps, on plain datetimes."""
import datetime

from xcoalesce_agent.reclaim import schedule
from xcoalesce_agent.configvalues import Window, windows as parse_windows

# 2026-11-23 is a Monday.
MONDAY = datetime.datetime(2026, 11, 23)


def at(day_offset, hour, minute=0):
    return MONDAY + datetime.timedelta(days=day_offset, hours=hour, minutes=minute)


def test_no_windows_means_any_time():
    assert schedule.in_window([], at(2, 13))
    assert schedule.next_window_start([], at(2, 13)) == at(2, 13)
    assert schedule.current_window_start([], at(2, 13)) == at(2, 0)


def test_inside_and_outside_a_weekday_window():
    windows = parse_windows("Mon-Fri 01:00-05:00")
    assert schedule.in_window(windows, at(0, 1))
    assert schedule.in_window(windows, at(4, 4, 59))
    assert not schedule.in_window(windows, at(0, 5))
    assert not schedule.in_window(windows, at(5, 2))
    assert schedule.current_window_start(windows, at(2, 3, 30)) == at(2, 1)


def test_window_past_midnight_belongs_to_the_day_it_opens():
    windows = [Window(frozenset([6]), 22 * 60, 2 * 60)]  # Sunday 22:00 to Monday 02:00
    assert schedule.in_window(windows, at(6, 23))
    assert schedule.in_window(windows, at(7, 1, 30))
    assert schedule.current_window_start(windows, at(7, 1, 30)) == at(6, 22)
    assert not schedule.in_window(windows, at(1, 1, 30))
    assert not schedule.in_window(windows, at(0, 22, 30))


def test_next_window_start():
    windows = parse_windows("Sat,Sun 01:00-05:00; Wed 12:00-13:00")
    assert schedule.next_window_start(windows, at(0, 9)) == at(2, 12)
    assert schedule.next_window_start(windows, at(2, 12, 30)) == at(2, 12, 30)
    assert schedule.next_window_start(windows, at(2, 13)) == at(5, 1)
    assert schedule.next_window_start(windows, at(6, 6)) == at(9, 12)


def test_whole_day_window():
    windows = parse_windows("Sun 00:00-24:00")
    assert schedule.in_window(windows, at(6, 23, 59))
    assert not schedule.in_window(windows, at(7, 0))


def test_caps_left():
    assert schedule.caps_left(0, 0, 5, 10) == (None, None)
    assert schedule.caps_left(3, 100, 1, 40) == (2, 60)
    assert schedule.caps_left(3, 100, 5, 400) == (0, 0)
