"""The foreground service: inspect on an interval, serve the last good inspection on /metrics, and
leaf-coalesce on schedule.

Inspections run in their own thread; a scrape only renders what they left (collector.py). An
inspection that fails keeps the previous one served and is counted in the metrics. The same thread
first repairs what an interrupted run left at each cycle (the journal; the marks in xapi when the
inspection saw some: repair.startup_repair), and after each good inspection hands it to the
scheduled run (scheduled.py: mode, windows, caps, lock); when that changed the host it inspects again,
so /metrics shows the result. With `trigger_on_snapshot_delete`, a snapshot watcher wakes it once
the GC settled after a deletion. SIGTERM and SIGINT stop the service cleanly: a run under way ends
its current step, undoes it and begins no other (stopping.py) before the process exits. SIGHUP
rereads the configuration file and inspects at once.
"""
import logging
import signal
import socket
import threading
import time

from . import config as config_module, stopping
from .export import collector, http
from .inspect import inspection, xapi
from .reclaim import history, leftovers, plans, repair, scheduled, snapshot_trigger
from .errors import AgentError, ConfigError, HostUnreachable

LOG = logging.getLogger(__name__)

# How long a stop waits for an inspection under way; a run under way is waited for until it has
# undone its current step (the units' TimeoutStopSec bounds that).
SHUTDOWN_GRACE_SECONDS = 5.0

# Stages of a failed inspection: xapi unreachable; host tools (vhd-util) or this host's record
# unavailable; any other agent error; a bug. Their error counters start at 0.
FAILURE_STAGES = ("xapi", "host", "inspection", "internal")


class Service(object):
    """The service's moving parts; `run()` drives them until a stop signal."""

    def __init__(self, config, listen_address=None):
        self.config = config
        self._listen_address = listen_address
        self.status = collector.AgentStatus(host=socket.gethostname(), stages=FAILURE_STAGES)
        self.history = history.RunHistory(config.agent.state_dir)
        self.exposition = collector.Exposition(self.status, self.history)
        self.server = http.from_web_config(self.exposition, config.web, listen_address)
        self._stop = threading.Event()
        self._wake_main = threading.Event()
        self._wake_inspection = threading.Event()
        self._reload_requested = False
        self._watcher = None
        self._acting = threading.Event()  # set while a repair or a run may change the host

    def run(self):
        self.server.start()
        self._start_watcher(self.config)
        worker = threading.Thread(target=self._inspect_forever, name="inspection")
        worker.daemon = True
        previous = {number: signal.signal(number, self._on_signal)
                    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            worker.start()
            while not self._stop.is_set():
                self._wake_main.wait(1.0)
                self._wake_main.clear()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            self.server.stop()
            self._stop_watcher()
            self._wake_inspection.set()
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while worker.is_alive() and (self._acting.is_set() or time.monotonic() < deadline):
                worker.join(0.1)
        LOG.info("stopped")
        return 0

    def _on_signal(self, number, frame):
        if number == signal.SIGHUP:
            self._reload_requested = True
        else:
            LOG.info("stopping on signal %d", number)
            stopping.request()
            self._stop.set()
        self._wake_main.set()

    def reload(self):
        """Reread the configuration file; a bad one is logged and the running configuration kept."""
        try:
            config = config_module.load(self.config.path)
        except ConfigError as error:
            LOG.error("reload: %s; keeping the running configuration", error)
            return
        if vars(config.web) != vars(self.config.web) or config.agent.state_dir != self.config.agent.state_dir:
            try:
                self._restart_web(config)
            except ConfigError as error:
                LOG.error("reload: %s; keeping the running configuration", error)
                return
        if watcher_settings(config) != watcher_settings(self.config):
            self._stop_watcher()
            self._start_watcher(config)
        self.config = config
        LOG.info("reloaded %s", config.path)
        self._wake_inspection.set()

    def _restart_web(self, config):
        """Serve with the new [web] and state directory; on failure the old server serves again."""
        run_history = history.RunHistory(config.agent.state_dir)
        exposition = collector.Exposition(self.status, run_history)
        server = http.from_web_config(exposition, config.web, self._listen_address)
        self.server.stop()
        try:
            server.start()
        except ConfigError:
            self.server.start()
            raise
        self.server, self.history, self.exposition = server, run_history, exposition

    def _start_watcher(self, config):
        if snapshot_trigger.watching(config):
            self._watcher = snapshot_trigger.SnapshotWatcher(config, on_settled=self._on_snapshots_settled)
            self._watcher.start()

    def _stop_watcher(self):
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def _on_snapshots_settled(self, sr_uuid):
        LOG.info("SR %s settled after a snapshot deletion; inspecting it now", sr_uuid)
        self._wake_inspection.set()

    def _inspect_forever(self):
        """The inspection thread. Each cycle repairs what an interrupted run left (the journal; the
        marks in xapi when the inspection saw some), inspects, and hands a good inspection to the
        scheduled run; whatever fails is logged and the next cycle comes."""
        while not self._stop.is_set():
            config = self.config
            try:
                self._act(repair.startup_repair, config)
            except Exception as error:
                log_unexpected("repairing what an interrupted run left", error)
            try:
                result = self.inspect_once(config)
                if (result is not None and leftovers.count_marks(result) and not self._stop.is_set()
                        and self._act(repair.startup_repair, config, True)):
                    result = self.inspect_once(config)
                if result is not None and not self._stop.is_set() and self._act(self.scheduled_run, config, result):
                    self.inspect_once(config)
            except Exception as error:
                log_unexpected("inspection round", error)
                self.status.failed("internal")
            self._wake_inspection.wait(config.inspection.interval_seconds)
            self._wake_inspection.clear()

    def _act(self, function, *args):
        """Call something that may change the host; a stop waits for it to return."""
        self._acting.set()
        try:
            return function(*args)
        finally:
            self._acting.clear()

    def scheduled_run(self, config, result):
        """Leaf-coalesce on schedule after an inspection; True when a run changed the host."""
        try:
            runs = scheduled.scheduled_run(config, result)
        except Exception as error:
            log_unexpected("scheduled leaf coalesce", error)
            return False
        return any(run.result != plans.SKIPPED for run in runs)

    def inspect_once(self, config):
        """One inspection; its result, or its failure, goes into the status the metrics show.
        Returns the inspection, or None when it failed."""
        try:
            result = inspection.inspect(config)
            self.status.succeeded(result, time.time())
            self.exposition.prepare()
        except HostUnreachable as error:
            reachable = xapi_reachable(config)
            LOG.error("inspection failed: %s; serving the last good inspection", error)
            self.status.failed("host" if reachable else "xapi", xapi_reachable=reachable)
        except AgentError as error:
            LOG.error("inspection failed: %s; serving the last good inspection", error)
            self.status.failed("inspection")
        except Exception as error:
            log_unexpected("inspection", error, "serving the last good inspection")
            self.status.failed("internal")
        else:
            LOG.info("inspected %d SRs in %.1f s: %d bytes reclaimable by leaf coalesce",
                     len(result.srs or ()), result.duration_seconds or 0, result.reclaimable_bytes)
            for error in result.errors or ():
                LOG.warning("inspection: %s: %s", error["stage"], error["message"])
            return result
        return None


def log_unexpected(what, error, then="trying again at the next inspection"):
    """A failure the agent has no words for: one line, and its traceback at debug level."""
    LOG.error("%s failed: %s: %s; %s", what, type(error).__name__, error, then)
    LOG.debug("%s failed", what, exc_info=True)


def watcher_settings(config):
    """What the snapshot watcher depends on: on reload it is restarted when these change."""
    return snapshot_trigger.watching(config), vars(config.xapi), config.agent.state_dir


def xapi_reachable(config):
    """Whether a session with xapi can be opened now (to tell an xapi failure from a vhd-util one)."""
    try:
        with xapi.open_session(config):
            return True
    except HostUnreachable:
        return False


def run(config, listen_address=None):
    """Run the service in the foreground until SIGTERM or SIGINT; 0 on a clean stop."""
    return Service(config, listen_address).run()
