"""Steps of the simulated SM that tests hold, so that they look at a GC or a plugin call in the middle
of its work without relying on timing.

`gate = sm.gate(name)`: the next thread to reach the step waits there until `gate.release()`;
`gate.wait_reached(timeout)` tells whether one got there; stopping SM releases all. The steps:
    gc.loop-start          a GC holds gc_active, before its first scan
    gc.before-merge        before any merge of a VHD into its parent (coalesce, snapshot-coalesce, leaf)
    gc.before-snapshot     before a snapshot-coalesce round's internal VDI.snapshot
    gc.snapshot-paused     inside that snapshot: the leaf paused, the base copy's record made
    plugin.start           the plugin call has begun, before its first GC pass
    plugin.before-suspend  the plugin is about to suspend the VM
    plugin.dry-run-loop    each round of the plugin's final dry run that found a candidate (4.1)
A busy VDI (SM's pause with failfast fails at once): hold `sm.vdi_lock(vdi_uuid)`.
"""
import threading


class Gate(object):
    """A step of the simulated SM a test holds: the next thread to reach it waits until release()."""

    def __init__(self, name, stopping):
        self.name = name
        self._stopping = stopping
        self._reached = threading.Event()
        self._released = threading.Event()

    def wait_reached(self, timeout=10.0):
        """True once a thread waits at (or went through) the step."""
        return self._reached.wait(timeout)

    def release(self):
        self._released.set()

    def pass_through(self):
        self._reached.set()
        while not (self._released.wait(0.05) or self._stopping.is_set()):
            pass

class Gates(object):
    """The StorageManager's steps: `gate(name)` for tests, `step(name)` where SM reaches one."""

    def gate(self, name):
        """Hold the step `name` (see the module docstring) for the next thread that reaches it."""
        gate = Gate(name, self.stopping)
        with self._lock:
            self._gates[name] = gate
        return gate

    def step(self, name):
        with self._lock:
            gate = self._gates.pop(name, None)
        if gate is not None:
            gate.pass_through()
