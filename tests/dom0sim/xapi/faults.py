"""Failure injection for fault tests: failing methods and VM operations, dropped connections, slow calls."""
import threading
import time

from .errors import XapiError


class Faults(object):
    """What should go wrong, set by tests and consulted by the server and the VM operations."""

    def __init__(self):
        self._lock = threading.Lock()
        self.clear()

    def clear(self):
        """Everything works again."""
        with self._lock:
            self._methods = {}
            self._vm_operations = {}
            self._durations = {}
            self._drop_at = None
            self._drops_left = None
            self._calls = 0

    def fail_method(self, method, code, *params, **options):
        """Calls of `method` (e.g. "SR.scan", or "*" for every method) fail with [code, *params];
        `times=N` for only the next N calls."""
        with self._lock:
            self._methods[method] = [[code] + list(params), options.get("times")]

    def fail_vm_operation(self, vm_uuid, op, code="INTERNAL_ERROR", *params):
        """The VM's `op` ("suspend", "resume", ...) fails, the VM staying in its power state, until cleared."""
        if not params and code == "INTERNAL_ERROR":
            params = ("xenopsd internal error: {} of VM {} failed".format(op, vm_uuid),)
        with self._lock:
            self._vm_operations[(vm_uuid, op)] = [code] + list(params)

    def clear_vm_operation(self, vm_uuid, op):
        with self._lock:
            self._vm_operations.pop((vm_uuid, op), None)

    def drop_connections(self, from_call=1, times=None):
        """From the `from_call`-th call on (counting from now) the server closes the connection instead of
        answering; `times=N` drops only N calls. The real client retries a dropped call once."""
        with self._lock:
            self._calls = 0
            self._drop_at = from_call
            self._drops_left = times

    def set_duration(self, method, seconds):
        """`method` (e.g. "VM.suspend", "host.call_plugin") takes at least this long."""
        with self._lock:
            self._durations[method] = seconds

    def should_drop(self):
        """Count a call arriving at the server; True if its connection is to be dropped."""
        with self._lock:
            self._calls += 1
            if self._drop_at is None or self._calls < self._drop_at or self._drops_left == 0:
                return False
            if self._drops_left is not None:
                self._drops_left -= 1
            return True

    def check_method(self, method):
        """Raise the failure injected for `method`, if any."""
        with self._lock:
            key = method if method in self._methods else "*"
            entry = self._methods.get(key)
            if entry is None:
                return
            details, times = entry
            if times is not None:
                if times <= 1:
                    del self._methods[key]
                else:
                    entry[1] = times - 1
        raise XapiError(*details)

    def check_vm_operation(self, vm_uuid, op):
        with self._lock:
            details = self._vm_operations.get((vm_uuid, op))
        if details is not None:
            raise XapiError(*details)

    def take_time(self, method):
        with self._lock:
            seconds = self._durations.get(method, 0)
        if seconds > 0:
            time.sleep(seconds)
