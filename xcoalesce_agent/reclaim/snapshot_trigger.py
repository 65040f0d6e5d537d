"""The trigger after snapshot deletion: xapi's VDI events say a snapshot went; once the SR's GC
has settled, the SR waits on disk for the next scheduled run (the modern form of "coalesce all
guests after the backup job")."""
import logging
import os
import threading
import time

import XenAPI

from ..errors import HostUnreachable
from ..jsonfile import read_json, write_json
from ..inspect.smgc import GC_START_SECONDS, gc_running
from ..inspect.xapi import TRANSPORT_ERRORS, describe, open_session

LOG = logging.getLogger(__name__)

PENDING_FILE = "pending-srs.json"


class PendingSrs(object):
    """SRs where a snapshot was deleted and whose leaves wait for the next window (kept on disk)."""

    def __init__(self, config):
        self.path = os.path.join(config.agent.state_dir, PENDING_FILE)
        self._lock = threading.Lock()

    def load(self):
        return sorted(read_json(self.path, []))

    def add(self, sr_uuids):
        with self._lock:
            write_json(self.path, sorted(set(self.load()) | set(sr_uuids)))

    def remove(self, sr_uuids):
        with self._lock:
            write_json(self.path, sorted(set(self.load()) - set(sr_uuids)))


def watching(config):
    """Whether the daemon should run a `SnapshotWatcher`."""
    return config.coalesce.mode != "off" and config.coalesce.trigger_on_snapshot_delete


class SnapshotWatcher(object):
    """Follows xapi's VDI events (`event.from`) in a thread; when a snapshot VDI is deleted, waits
    for the SR's GC to settle, then marks the SR pending (for `scheduled_run`) and settled (so the
    daemon inspects it now). `start()`, `stop()`, `wait_settled(timeout) -> [sr_uuid]`;
    `on_settled(sr_uuid)`, if given, is called from the watcher's thread (e.g. to wake the daemon).
    """

    EVENT_TIMEOUT = 2.0
    SETTLE_POLL_SECONDS = 0.5
    RETRY_SECONDS = 10.0

    def __init__(self, config, on_settled=None):
        self.config = config
        self.on_settled = on_settled
        self.pending = PendingSrs(config)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._settled = set()
        self._deleted = {}   # sr_uuid -> monotonic time of the deletion
        self._snapshots = {}  # VDI ref -> SR ref, for snapshot VDIs
        self._thread = None
        self.following = threading.Event()  # set once the snapshot VDIs present at start are known

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="snapshot-watcher", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.EVENT_TIMEOUT + 5)

    def wait_settled(self, timeout):
        """Block up to `timeout` seconds for SRs that settled after a snapshot deletion; returns them."""
        with self._changed:
            if not self._settled:
                self._changed.wait(timeout)
            settled, self._settled = sorted(self._settled), set()
        return settled

    def _loop(self):
        while not self._stop.is_set():
            try:
                with open_session(self.config) as session:
                    self._follow(session)
            except (HostUnreachable, XenAPI.Failure) + TRANSPORT_ERRORS as error:
                LOG.warning("snapshot watcher: %s; retrying in %g s", describe(error), self.RETRY_SECONDS)
                self._stop.wait(self.RETRY_SECONDS)

    def _follow(self, session):
        event_from = getattr(session.xenapi.event, "from")
        token = ""
        sr_uuids = {}
        while not self._stop.is_set():
            result = event_from(["VDI"], token, self.SETTLE_POLL_SECONDS if self._deleted else self.EVENT_TIMEOUT)
            token = result["token"]
            for event in result["events"]:
                self._note(session, event, sr_uuids)
            if not self.following.is_set():
                LOG.info("following snapshot deletions (%d snapshot VDIs now)", len(self._snapshots))
                self.following.set()
            self._settle(session)

    def _note(self, session, event, sr_uuids):
        ref = event["ref"]
        if event["operation"] == "del":
            sr_ref = self._snapshots.pop(ref, None)
            if sr_ref is not None and sr_ref in sr_uuids:
                LOG.info("snapshot VDI deleted on SR %s", sr_uuids[sr_ref])
                self._deleted[sr_uuids[sr_ref]] = time.monotonic()
            return
        record = event.get("snapshot") or {}
        if record.get("is_a_snapshot"):
            sr_ref = record["SR"]
            self._snapshots[ref] = sr_ref
            if sr_ref not in sr_uuids:
                sr_uuids[sr_ref] = session.xenapi.SR.get_uuid(sr_ref)

    def _settle(self, session):
        for sr_uuid, deleted in list(self._deleted.items()):
            if time.monotonic() - deleted < GC_START_SECONDS or gc_running(self.config, session, sr_uuid):
                continue
            del self._deleted[sr_uuid]
            self.pending.add([sr_uuid])
            with self._changed:
                self._settled.add(sr_uuid)
                self._changed.notify_all()
            if self.on_settled is not None:
                self.on_settled(sr_uuid)
