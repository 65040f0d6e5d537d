"""The guest freeze a run caused, measured rather than predicted, so that each run records it and
compares it with the planner's prediction."""
import logging
import threading
import time

import XenAPI

from . import planner
from ..errors import HostUnreachable
from ..inspect.xapi import TRANSPORT_ERRORS, describe, open_session

LOG = logging.getLogger(__name__)


class FreezeMeter(object):
    """How long each watched VDI's running VM is kept from running, measured from xapi's events.

    A VDI counts as frozen while SM has paused its tapdisk (`sm_config:paused=true`) or while its
    VM is suspending, suspended, pausing or paused. Only VMs running when the meter starts count;
    a VM that was not running loses nothing. Falls back to the elapsed time if xapi's events fail.
    """

    EVENT_TIMEOUT = 0.25  # how late the meter notices it is asked to stop

    def __init__(self, config, vdi_vms):
        self.config = config
        self.vdi_vms = dict(vdi_vms)  # vdi_uuid -> vm_uuid ("" when none)
        self._stop = threading.Event()
        self._thread = None
        self._failed = None
        self._started = None
        self._down_since = {}
        self._frozen = dict.fromkeys(self.vdi_vms, 0.0)
        self._vdi_paused = {}
        self._vm_down = {}
        self._refs = {}
        self._running = set()
        self._elapsed = 0.0

    def __enter__(self):
        self._started = time.monotonic()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(ready,), name="freeze-meter", daemon=True)
        self._thread.start()
        ready.wait(self.config.xapi.timeout_seconds)
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(self.config.xapi.timeout_seconds)
        self._finish(time.monotonic())

    def seconds(self, vdi_uuid):
        if self._failed is not None:
            LOG.warning("freeze not measured from xapi events (%s); counting the elapsed time", self._failed)
            return self._elapsed
        return self._frozen.get(vdi_uuid, 0.0)

    def _watch(self, ready):
        try:
            with open_session(self.config) as session:
                event_from = getattr(session.xenapi.event, "from")
                watched = self._subscriptions(session)
                token = ""
                while True:
                    last = self._stop.is_set()
                    result = event_from(watched, token, 0.0 if last or not token else self.EVENT_TIMEOUT)
                    token = result["token"]
                    for event in result["events"]:
                        self._apply(event)
                    ready.set()
                    if last:
                        return
        except (HostUnreachable, XenAPI.Failure) + TRANSPORT_ERRORS as error:
            self._failed = describe(error)
        finally:
            ready.set()

    def _subscriptions(self, session):
        self._refs = {}
        running = set()
        for vdi_uuid, vm_uuid in self.vdi_vms.items():
            if not vm_uuid:
                continue
            vm_ref = session.xenapi.VM.get_by_uuid(vm_uuid)
            if session.xenapi.VM.get_power_state(vm_ref) != planner.RUNNING:
                continue
            running.add(vm_uuid)
            self._refs[session.xenapi.VDI.get_by_uuid(vdi_uuid)] = ("vdi", vdi_uuid)
            self._refs[vm_ref] = ("vm", vm_uuid)
        self._running = running
        return ["{}/{}".format(kind, ref) for ref, (kind, _) in self._refs.items()]

    def _apply(self, event):
        kind, uuid = self._refs.get(event["ref"], (None, None))
        record = event.get("snapshot")
        if kind is None or record is None:
            return
        if kind == "vdi":
            self._vdi_paused[uuid] = record.get("sm_config", {}).get("paused") == "true"
        else:
            operations = set(record.get("current_operations", {}).values())
            self._vm_down[uuid] = (record.get("power_state") in ("Suspended", "Paused")
                                   or bool(operations & {"suspend", "pause"}))
        self._account(time.monotonic())

    def _account(self, now):
        for vdi_uuid, vm_uuid in self.vdi_vms.items():
            down = vm_uuid in self._running and (self._vdi_paused.get(vdi_uuid) or self._vm_down.get(vm_uuid))
            since = self._down_since.get(vdi_uuid)
            if down and since is None:
                self._down_since[vdi_uuid] = now
            elif not down and since is not None:
                self._frozen[vdi_uuid] += now - since
                del self._down_since[vdi_uuid]

    def _finish(self, now):
        self._elapsed = now - self._started
        for vdi_uuid, since in list(self._down_since.items()):
            self._frozen[vdi_uuid] += now - since
        self._down_since = {}
