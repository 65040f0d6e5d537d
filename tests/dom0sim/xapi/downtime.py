"""Every interval in which a VM does not run: paused, suspended, or its disk I/O frozen by the storage manager."""
import threading
import time

PAUSED = "paused"
SUSPENDED = "suspended"
IO_FROZEN = "io-frozen"


class Interval(object):
    """One stretch of downtime; `end` is None while it lasts. Times are time.monotonic() seconds."""

    __slots__ = ("kind", "start", "end")

    def __init__(self, kind, start, end=None):
        self.kind = kind
        self.start = start
        self.end = end

    @property
    def duration(self):
        return (time.monotonic() if self.end is None else self.end) - self.start

    def __repr__(self):
        return "Interval({!r}, {:.3f}, {})".format(
            self.kind, self.start, "open" if self.end is None else "{:.3f}".format(self.end))


class DowntimeLog(object):
    """Intervals per VM uuid, fed by power-state changes and by freeze/thaw calls."""

    def __init__(self):
        self._lock = threading.Lock()
        self._intervals = {}
        self._open_power = {}
        self._freezes = {}

    def power_kind_changed(self, vm_uuid, kind):
        """The VM's downtime kind is now `kind` (PAUSED, SUSPENDED or None when it runs)."""
        now = time.monotonic()
        with self._lock:
            current = self._open_power.get(vm_uuid)
            if current is not None and current.kind == kind:
                return
            if current is not None:
                current.end = now
                del self._open_power[vm_uuid]
            if kind is not None:
                self._open_power[vm_uuid] = self._add(vm_uuid, kind, now)

    def freeze(self, vm_uuid):
        """Disk I/O of the VM stops; nested freezes count, the interval ends at the last thaw."""
        with self._lock:
            depth, interval = self._freezes.get(vm_uuid, (0, None))
            if depth == 0:
                interval = self._add(vm_uuid, IO_FROZEN, time.monotonic())
            self._freezes[vm_uuid] = (depth + 1, interval)

    def thaw(self, vm_uuid):
        with self._lock:
            depth, interval = self._freezes.get(vm_uuid, (0, None))
            if depth == 0:
                raise ValueError("I/O of VM {} is not frozen".format(vm_uuid))
            if depth == 1:
                interval.end = time.monotonic()
                del self._freezes[vm_uuid]
            else:
                self._freezes[vm_uuid] = (depth - 1, interval)

    def intervals(self, vm_uuid):
        """Copies of the VM's intervals in the order they began."""
        with self._lock:
            return [Interval(i.kind, i.start, i.end) for i in self._intervals.get(vm_uuid, [])]

    def _add(self, vm_uuid, kind, start):
        interval = Interval(kind, start)
        self._intervals.setdefault(vm_uuid, []).append(interval)
        return interval
