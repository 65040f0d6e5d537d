"""One GC run over one SR, as cleanup.py's _gcLoop: garbage deleted, hidden single-child parents
coalesced, leaves leaf-coalesced live (I/O frozen) or through snapshot-coalesce rounds until the leaf
is small enough (or given up, by the generation's CoalesceTracker), free space checked first, the
parent renamed to the leaf's UUID after a leaf coalesce, and xapi's records kept in step. Every merge
really copies data (vhdfile.coalesce) and lasts bytes / SR speed (smmerge.py).
"""
import collections

from tests.dom0sim import lvm, vhdformat
from tests.dom0sim.smimages import TMP_RENAME_PREFIX, Forest
from tests.dom0sim.smmerge import read_speed
from tests.dom0sim.smrecords import VHD_BLOCKS_KEY
from tests.dom0sim.smstore import SmError
from tests.dom0sim.xapi import tasks

MIB = 1024 * 1024
LIVE_LEAF_COALESCE_MAX_SIZE = 20 * MIB
LIVE_LEAF_COALESCE_TIMEOUT = 10.0
TIMEOUT_SAFETY_MARGIN = 0.5
LEAF_COALESCE_KEY = "leaf-coalesce"
GC_TASK_LABEL = "Garbage Collection"
DRY_RUN_PERIOD = 0.02            # seconds between the rounds of a dry run that finds work
TREE_INDENT = 8                  # the SR's state summary: a tree's root, then each level deeper
TREE_INDENT_STEP = 4


class Aborted(SmError):
    """The GC was told to stop (SM stopping): cleanup.py's AbortException."""


class GcPass(object):
    """cleanup.py's _gcLoop for one SR: garbage, then one coalesce or one leaf coalesce, rescan, repeat.

    A dry run (`dry_run`) logs what it would do and changes nothing, so it keeps going round while
    there is work, as SM's does."""

    def __init__(self, sm, sr_uuid, quiet_seconds=0.0, dry_run=False):
        self.sm = sm
        self.quiet_seconds = quiet_seconds
        self.dry_run = dry_run
        self.task = None
        self.done = 0
        self.records = sm.records
        self.sr_uuid = sr_uuid
        self.sr_ref = self.records.sr_ref(sr_uuid)
        self.store = sm.store(sr_uuid)
        self.failed = set()
        self.no_space = {}
        self.log = sm.log
        self.name_label = self.sr_field("name_label")
        self.forest = Forest([])        # the last scan's: none yet
        self.logged_trees = {}
        self.state_logged = False

    # -- the loop --

    def run(self):
        """One GC run: gc_active for the whole run (or exit at once), a "Garbage Collection" task only
        while there is work, the SR's state summary last."""
        if not self.enabled():
            return
        try:
            self.run_active()
        finally:
            self.log_state()

    def run_active(self):
        gc_active = self.sm.sm_lock(self.sr_uuid, "gc_active")
        with self.sm.sr_lock(self.sr_uuid):      # LockActive: not while another holds the SR lock
            acquired = gc_active.acquire_noblock()
        if not acquired:
            self.log("Another GC instance already active, exiting")
            return
        try:
            self.sm.step("gc.loop-start")
            try:
                self.run_locked()
            finally:
                self.log("GC process exiting, no work left")
        finally:
            gc_active.release()
            self.report_no_space()

    def run_locked(self):
        if not self.has_work(self.scan()):
            self.log("No work, exiting")
            return
        self.task = tasks.create(self.sm.db, GC_TASK_LABEL, "Garbage collection for SR " + self.sr_uuid,
                                 other_config={"applies_to": self.sr_ref})
        try:
            self.pause()
            self.loop()
        finally:
            self.sm.db.destroy("task", self.task)

    def has_work(self, forest):
        return bool(forest.garbage() or self.find_coalesceable(forest) or self.find_leaf_coalesceable(forest))

    def pause(self):
        """The quiet period a background GC (not immediate) keeps before working once the SR had a GC."""
        if self.quiet_seconds > 0:
            self.log("GC active, about to go quiet")
            self.sm.stopping.wait(self.quiet_seconds)
            self.log("GC active, quiet period ended")

    def loop(self):
        while True:
            if self.sm.stopping.is_set():
                self.log("Term requested")
                return
            if not self.has_work(self.scan()):
                self.log("No work, exiting")
                return
            with self.sm.held(self.sm.sm_lock(self.sr_uuid, "running")):
                self.iteration()
            if self.dry_run:
                self.sm.step("plugin.dry-run-loop")
                self.sm.stopping.wait(self.sm.dry_run_period)

    def iteration(self):
        forest = self.scan()
        if not self.dry_run:
            self.update_block_info(forest)
        self.report_progress(forest)
        garbage = forest.garbage()
        if garbage:
            self.log("Found {} VDIs for deletion:".format(len(garbage)))
            for image in garbage:
                self.log("  {}".format(self.sm.label(image)))
            if not self.dry_run:
                for image in garbage:
                    self.log("Deleting unlinked VDI {}".format(self.sm.label(image)))
                    self.delete(image)
            forest = self.scan()
        candidate = self.find_coalesceable(forest)
        if candidate is not None:
            self.log("Coalescing {} -> {}".format(self.sm.label(candidate), self.sm.label(candidate.parent)))
            if not self.dry_run:
                self.coalesce(candidate)
            self.done += 1
            return
        candidate = self.find_leaf_coalesceable(forest)
        if candidate is not None:
            self.log("Leaf-coalescing {} -> {}".format(self.sm.label(candidate), self.sm.label(candidate.parent)))
            if not self.dry_run:
                self.coalesce_leaf(candidate)
            self.done += 1

    def report_progress(self, forest):
        """The task's progress counts pairs, as SM's does: done / (done + coalesceable now)."""
        pending = len(forest.coalesceable()) + len(forest.leaf_coalesceable())
        if self.task is not None and self.done + pending:
            tasks.set_progress(self.sm.db, self.task, float(self.done) / (self.done + pending))

    def enabled(self):
        if self.switch("gc") == "false":
            self.log("GC is disabled for this SR, abort")
            return False
        return True

    def switch(self, key):
        return self.sr_field("other_config").get(key)

    def sr_field(self, name):
        return self.sm.db.get_field("SR", self.sr_ref, name)

    def scan(self):
        forest = Forest(self.store.scan())
        if forest.orphans:
            orphan = forest.orphans[0]
            raise SmError("Parent VDI {} of {} not found".format(orphan.parent_footer_uuid, orphan.uuid))
        self.forest = forest
        self.log_state()
        return forest

    # -- the SR's state summary --

    def log_state(self):
        """SR.LogFilter.logState, after each scan and at the end of a run: `SR 4659 ('name') (6 VDIs in
        5 VHD trees): ` then every tree the first time, later `no changes` or `showing only VHD trees
        that changed:` and those trees (the SR's full UUID when it has no name)."""
        trees = collections.OrderedDict((root.uuid, self.tree_text(root)) for root in self.forest.roots)
        changes = "".join(text for uuid, text in trees.items() if self.logged_trees.get(uuid) != text)
        changes += "".join("Tree {} gone\n".format(uuid) for uuid in self.logged_trees if uuid not in trees)
        text = "SR {} ({} VDIs in {} VHD trees): ".format(self.sr_name(), len(self.forest.images), len(trees))
        if changes:
            if self.state_logged:
                text += "showing only VHD trees that changed:"
            text += "\n" + changes
        else:
            text += "no changes"
        self.log(text)
        self.logged_trees = trees
        self.state_logged = True

    def tree_text(self, image, indent=TREE_INDENT):
        return " " * indent + self.sm.label(image) + "\n" + "".join(
            self.tree_text(child, indent + TREE_INDENT_STEP) for child in image.children)

    def sr_name(self):
        """str(SR): 4 hex digits of its UUID and its name, or its full UUID when the name is empty."""
        return "{} ('{}')".format(self.sr_uuid[:4], self.name_label) if self.name_label else self.sr_uuid

    def update_block_info(self, forest):
        """SR.updateBlockInfo: every VHD with children gets sm-config:vhd-blocks if it lacks it."""
        for image in forest.images.values():
            if not image.scan_error and image.children and self.vdi_setting(image, "sm_config",
                                                                            VHD_BLOCKS_KEY) is None:
                self.sm.record_block_info(image)

    def vdi_setting(self, image, field, key=None):
        record = self.records.vdi_config(image.uuid)
        if record is None:
            return None
        return record[field].get(key) if key else record[field]

    # -- candidates --

    def find_coalesceable(self, forest):
        if self.switch("coalesce") == "false":
            self.log("Coalesce disabled for this SR")
            return None
        free = self.store.free_space()
        for candidate in forest.coalesceable():
            if candidate.uuid in self.failed:
                continue
            if self.store.extra_for_coalesce(candidate) <= free:
                self.log("Coalesce candidate: {} (tree height {})".format(self.sm.label(candidate),
                                                                          candidate.root().height()))
                self.no_space.pop(candidate.uuid, None)
                return candidate
            self.no_space[candidate.uuid] = candidate
            self.log("No space to coalesce {} (free space: {})".format(self.sm.label(candidate), free))
        return None

    def find_leaf_coalesceable(self, forest):
        if self.switch("coalesce") == "false":
            self.log("Coalesce disabled for this SR")
            return None
        if self.switch(LEAF_COALESCE_KEY) == "false":
            self.log("Leaf-coalesce disabled for this SR")
            return None
        free = self.store.free_space()
        for candidate in forest.leaf_coalesceable():
            if candidate.uuid in self.failed or not self.leaf_allowed(candidate):
                continue
            needed = self.store.extra_for_snapshot_coalesce(candidate)
            needed_live = needed
            if needed > free:
                needed_live = self.store.extra_for_leaf_coalesce(candidate)
                if self.can_live_coalesce(candidate):
                    needed = needed_live
            if needed <= free:
                self.log("Leaf-coalesce candidate: {}".format(self.sm.label(candidate)))
                self.no_space.pop(candidate.uuid, None)
                return candidate
            self.log("No space to leaf-coalesce {} (free space: {})".format(self.sm.label(candidate), free))
            if needed_live <= free:
                self.log("...but enough space if skip snap-coalesce")
                self.set_leaf_coalesce(candidate.uuid, "offline")
            self.no_space[candidate.uuid] = candidate
        return None

    def leaf_allowed(self, image):
        record = self.records.vdi_config(image.uuid)
        if record is None:
            return False
        if record["on_boot"] == "reset":
            self.log("Skipping reset-on-boot {}".format(self.sm.label(image)))
            return False
        if record["allow_caching"]:
            self.log("Skipping allow_caching=true {}".format(self.sm.label(image)))
            return False
        if record["other_config"].get(LEAF_COALESCE_KEY) == "false":
            self.log("Leaf-coalesce disabled for {}".format(self.sm.label(image)))
            return False
        return True

    def forced(self, image):
        return self.vdi_setting(image, "other_config", LEAF_COALESCE_KEY) == "force"

    def can_live_coalesce(self, image):
        """VDI.canLiveCoalesce: floor(allocated / speed) strictly under half the timeout, or without a
        speed figure under 20 MiB allocated; a forced leaf always."""
        speed = read_speed(self.sm.speed_log(self.sr_uuid))
        allowed = TIMEOUT_SAFETY_MARGIN * self.sm.live_timeout
        if speed:
            feasible = image.allocated_size // speed < allowed
        else:
            feasible = image.allocated_size < LIVE_LEAF_COALESCE_MAX_SIZE
        return feasible or self.forced(image)

    # -- deleting, coalescing a hidden parent --

    def delete(self, image):
        with self.sm.sr_lock(self.sr_uuid):
            self.store.remove(image.uuid)
            self.sm.forget_vdi(image.uuid)

    def coalesce(self, image):
        """Merge a hidden single-child VHD into its parent, relink its children, delete it."""
        self.sm.step("gc.before-merge")
        parent = image.parent
        try:
            with self.store.working_on([image.uuid] + [child.uuid for child in image.children]):
                self.coalesce_onto_parent(image)
            with self.sm.sr_lock(self.sr_uuid):
                for child in image.children:
                    self.log("  Relinking {} from {} to {}".format(child.uuid, image.uuid, parent.uuid))
                    with self.store.working_on([child.uuid]), self.sm.io_lock(child.uuid):
                        self.store.set_parent(child.uuid, parent.uuid)
                    self.sm.update_vdi(self.sr_uuid, child.uuid, parent_uuid=parent.uuid)
                self.delete(image)
                self.sm.update_vdi(self.sr_uuid, parent.uuid)
        except Aborted:
            raise
        except (SmError, lvm.LvmError, vhdformat.VhdError, OSError) as exc:
            self.failed.add(image.uuid)
            self.sm.log_exception("coalesce", exc)
            self.log("Coalesce failed, skipping")

    def coalesce_onto_parent(self, image):
        """_doCoalesce: the parent made writable and inflated, the merge, the parent deflated, read-only
        again and its vhd-blocks brought up to date."""
        parent = image.parent
        self.store.set_readonly(parent.uuid, False)
        try:
            if self.store.lvm:
                extra = self.store.extra_for_coalesce(image)
                if extra > 0:
                    self.store.inflate(parent.uuid, parent.lv_size + extra)
            try:
                with self.sm.smlog.child():
                    self.log("  Running VHD coalesce on {}".format(self.sm.label(image)))
                self.sm.timed_merge(self.sr_uuid, image.path)
                self.log("  Child process completed successfully")
            finally:
                self.store.deflate(parent.uuid)
        finally:
            self.store.set_readonly(parent.uuid, True)
        self.sm.record_block_info(self.store.image(parent.uuid))

    # -- leaf coalesce --

    def set_leaf_coalesce(self, vdi_uuid, value):
        ref = self.records.vdi_ref(vdi_uuid)
        if ref:
            self.records.set_map_key("VDI", ref, "other_config", LEAF_COALESCE_KEY, value)

    def coalesce_leaf(self, image):
        vdi_uuid = image.uuid
        try:
            tracker = self.sm.generation.tracker(self.log, self.sm.sm_log)
            while not self.can_live_coalesce(image):
                if self.sm.stopping.is_set():
                    raise Aborted("Aborting due to signal")
                before = image.vhd_size
                image = self.snapshot_coalesce(image)
                if image is None:
                    return
                if tracker.give_up(before, image.vhd_size):
                    tracker.log_reasoning()
                    raise SmError("VDI {} could not be coalesced".format(vdi_uuid))
            tracker.log_summary()
            self.live_leaf_coalesce(vdi_uuid)
        except Aborted:
            raise
        except (SmError, lvm.LvmError, vhdformat.VhdError, OSError) as exc:
            self.failed.add(vdi_uuid)
            self.sm.log_exception("leaf-coalesce", exc)
            self.log("Leaf-coalesce failed on {}, skipping".format(self.sm.label(image) if image else vdi_uuid[:8]))
        finally:
            self.set_leaf_coalesce(vdi_uuid, None)

    def snapshot_coalesce(self, image):
        """Single-snapshot the leaf, coalesce the temporary snapshot away; the leaf as it is now, or None."""
        self.log("Single-snapshotting {}".format(self.sm.label(image)))
        self.sm.step("gc.before-snapshot")
        temp_uuid = self.sm.internal_snapshot(self.sr_uuid, image)
        self.log("Single-snapshot returned: {}".format(self.records.vdi_ref(temp_uuid)))
        forest = self.scan()
        temp = forest.get(temp_uuid)
        if temp is None or not temp.is_coalesceable():
            self.log("The VDI appears to have been concurrently snapshotted")
            return None
        self.log("Coalescing parent {}".format(self.sm.label(temp)))
        self.coalesce(temp)
        leaf = self.scan().get(image.uuid)
        if leaf is None or not leaf.is_leaf_coalesceable():
            self.log("The VDI tree appears to have been altered since")
            return None
        return leaf

    def live_leaf_coalesce(self, vdi_uuid):
        """Pause the VDI (failing at once if it is busy), merge the leaf into its parent, give the parent
        the leaf's name. The leaf's vhd-parent goes when there is no grandparent; otherwise SM 4.1 leaves
        it naming the old parent (until the next SR.scan) and SM 3.2 deletes it all the same."""
        self.sm.step("gc.before-merge")
        image = self.scan().get(vdi_uuid)
        if image is None or not image.is_leaf_coalesceable():
            self.log("The VDI is no longer leaf-coalesceable")
            return
        parent = image.parent
        timeout = None if self.forced(image) else self.sm.live_timeout
        if timeout is None:
            self.log("Leaf-coalesce forced, will not use timeout")
        old_uuid = TMP_RENAME_PREFIX + vdi_uuid
        with self.sm.sr_lock(self.sr_uuid), self.store.working_on([vdi_uuid]), self.sm.frozen(vdi_uuid, failfast=True):
            self.store.set_readonly(parent.uuid, False)
            if self.store.lvm:
                self.store.deflate(vdi_uuid)
                self.store.inflate(parent.uuid, self.store.full_size(parent))
            self.set_hidden(parent.uuid, False)
            try:
                self.sm.timed_merge(self.sr_uuid, image.path, timeout)
            except SmError as exc:
                if str(exc) == "Timed out":
                    self.sm.log_exception("_doCoalesceLeaf", exc)
                    self.log("*** UNDO LEAF-COALESCE")
                self.set_hidden(parent.uuid, True)
                self.store.deflate(parent.uuid)
                self.store.set_readonly(parent.uuid, True)
                if str(exc) == "Timed out":
                    self.log("*** leaf-coalesce undo successful")
                raise
            self.store.rename(vdi_uuid, old_uuid)
            self.store.rename(parent.uuid, vdi_uuid)
            self.set_hidden(old_uuid, True)
            self.sm.forget_vdi(parent.uuid)
            keep = parent.parent is not None and self.sm.generation.keeps_vhd_parent
            self.sm.update_vdi(self.sr_uuid, vdi_uuid, parent_uuid=None if keep else "")
        with self.sm.sr_lock(self.sr_uuid):
            self.store.remove(old_uuid)
            self.sm.update_vdi(self.sr_uuid, vdi_uuid)
        self.sm.unpaused(vdi_uuid)

    def set_hidden(self, uuid, hidden):
        self.store.set_hidden(uuid, hidden)

    # -- reporting a lack of space --

    def report_no_space(self):
        self.sm.report_no_space(self.sr_ref, self.sr_uuid, sorted(self.no_space))
