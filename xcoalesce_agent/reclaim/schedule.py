"""Maintenance windows and the caps per window: when the daemon may act on its own.

Pure: times come in as naive local `datetime` objects (the host's time zone) and windows as
`configvalues.Window(days, start, end)` (weekday numbers where the window opens, minutes since
midnight; `end < start` runs past midnight). No windows at all means any time.
"""
import datetime

MINUTES_PER_DAY = 1440


def _day_start(moment):
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _openings(window, around):
    """(start, end) datetimes of `window`'s openings on the days around `around`, earliest first."""
    today = _day_start(around)
    for offset in range(-1, 8):
        day = today + datetime.timedelta(days=offset)
        if day.weekday() not in window.days:
            continue
        start = day + datetime.timedelta(minutes=window.start)
        length = (window.end - window.start) % MINUTES_PER_DAY or MINUTES_PER_DAY
        yield start, start + datetime.timedelta(minutes=length)


def current_window_start(windows, now):
    """Start of the window `now` lies in (the key for its caps), or None when outside every window.

    With no windows configured every moment is allowed, and the window is the current day.
    """
    if not windows:
        return _day_start(now)
    starts = [start for window in windows for start, end in _openings(window, now) if start <= now < end]
    return min(starts) if starts else None


def in_window(windows, now):
    """True when the agent may act on its own at `now`."""
    return current_window_start(windows, now) is not None


def next_window_start(windows, now):
    """When the next window opens after `now` (`now` itself when inside one); None if there are none."""
    if not windows:
        return now
    current = current_window_start(windows, now)
    if current is not None:
        return now
    starts = [start for window in windows for start, _ in _openings(window, now) if start > now]
    return min(starts) if starts else None


def caps_left(max_vms, max_bytes, used_vms, used_bytes):
    """(VMs, bytes) still allowed in this window; None means unlimited (a cap of 0)."""
    vms = max(0, max_vms - used_vms) if max_vms else None
    left_bytes = max(0, max_bytes - used_bytes) if max_bytes else None
    return vms, left_bytes
