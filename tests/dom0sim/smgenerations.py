"""Everything that differs between the SM generations the simulated host can run, in one place: the
give-up rules of snapshot-coalesce (a CoalesceTracker class each) and the flags the GC and the
coalesce-leaf plugin read (`sm.generation.<flag>`). A new generation is a new tracker if its rules
differ and a new entry of GENERATIONS.

"3.2" is what XCP-ng 8.3 ships (the default), "4.1" is XenServer 8's SM from 4.1.10.
"""


class CoalesceTracker(object):
    """When SM 3.2 gives up snapshot-coalescing a leaf that does not shrink: a round whose leaf ends no
    bigger than it started counts as progress; one that ends bigger counts against it, and the leaf is
    given up after too many such rounds, too many rounds in all (judged only after a round without
    progress), or a second bump past 1.2 x the smallest size seen. `log` gets the lines SM writes to
    SMlog."""

    GRACE_ITERATIONS = 2
    MAX_ITERATIONS_NO_PROGRESS = 3
    MAX_ITERATIONS = 10
    MAX_INCREASE_FROM_MINIMUM = 1.2

    def __init__(self, log=None, sm_log=None):
        self.log = log or (lambda text: None)
        self.sm_log = sm_log or self.log
        self.iterations = 0
        self.no_progress = 0
        self.minimum = float("inf")
        self.grace = self.GRACE_ITERATIONS
        self.history = []
        self.reason = ""
        self.start_size = None
        self.finish_size = None

    def give_up(self, before, after):
        self.iterations += 1
        self.history.append("Iteration: {} -- Initial size {} --> Final size {}".format(
            self.iterations, before, after))
        self.finish_size = after
        if self.start_size is None:
            self.start_size = before
        self.minimum = min(self.minimum, before, after)
        if self.made_progress(before, after):
            return False
        self.no_progress += 1
        self.log("No progress, attempt: {}".format(self.no_progress))
        return self.exhausted(after)

    def made_progress(self, before, after):
        return self.iterations == 1 or before >= after

    def exhausted(self, after):
        if self.iterations > self.MAX_ITERATIONS:
            self.reason = "Max iterations ({}) exceeded".format(self.MAX_ITERATIONS)
            return True
        if self.no_progress > self.MAX_ITERATIONS_NO_PROGRESS:
            self.reason = "No progress made for {} iterations".format(self.MAX_ITERATIONS_NO_PROGRESS)
            return True
        if after > self.MAX_INCREASE_FROM_MINIMUM * self.minimum:
            self.grace -= 1
            if self.grace == 0:
                self.reason = "Unexpected bump in size, compared to minimum achieved"
                return True
        return False

    def log_sizes(self):
        self.log("Starting size was         {}".format(self.start_size))
        self.log("Final size was            {}".format(self.finish_size))
        self.log("Minimum size achieved was {}".format(self.minimum))

    def log_reasoning(self):
        """Why the leaf was given up, round by round."""
        self.log("Aborted coalesce")
        for line in self.history + [self.reason]:
            self.log(line)
        self.log_sizes()

    def log_summary(self):
        """After snapshot-coalesce rounds that shrank the leaf enough for a live merge."""
        if self.iterations:
            self.log("Coalesce summary")
            self.log("Performed {} iterations".format(self.iterations))
            self.log_sizes()


class CoalesceTrackerV41(CoalesceTracker):
    """SM 4.1.10+: up to 20 rounds, no judgement before the fourth, and a round also counts as progress
    when the leaf ends below the mean of every round's final size (logged by SM as "Calculated moving
    average", under the SM ident)."""

    MAX_ITERATIONS = 20
    FIRST_JUDGED_ITERATION = 4

    def __init__(self, log=None, sm_log=None):
        CoalesceTracker.__init__(self, log, sm_log)
        self.final_sizes = []

    def give_up(self, before, after):
        self.final_sizes.append(after)
        return CoalesceTracker.give_up(self, before, after)

    def made_progress(self, before, after):
        if self.iterations < self.FIRST_JUDGED_ITERATION or before >= after:
            return True
        average = sum(self.final_sizes) / len(self.final_sizes)
        self.sm_log("Calculated moving average as {}".format(average))
        return after < average


class Generation(object):
    """What differs between the SM generations the simulated host can run."""

    def __init__(self, name, tracker, plugin_calls_run_gc, plugin_waits_for_gc, plugin_final_dry_run,
                 keeps_vhd_parent, logs_fatal_errors):
        self.name = name
        self.tracker = tracker                            # the CoalesceTracker class
        self.plugin_calls_run_gc = plugin_calls_run_gc    # no `=== SR` for its passes; else cleanup.gc
        self.plugin_waits_for_gc = plugin_waits_for_gc    # wait_for_completion after the first pass
        self.plugin_final_dry_run = plugin_final_dry_run  # else a background GC with the quiet period
        self.keeps_vhd_parent = keeps_vhd_parent          # sm_config:vhd-parent left on the old parent
        self.logs_fatal_errors = logs_fatal_errors        # run_gc logs them; 3.2 raises (the journal)


GENERATIONS = {
    # XCP-ng 8.3: v3.2.12 (xcp-ng/sm 3.2.12-8.3)
    "3.2": Generation("3.2", CoalesceTracker, plugin_calls_run_gc=False, plugin_waits_for_gc=False,
                      plugin_final_dry_run=False, keeps_vhd_parent=False, logs_fatal_errors=False),
    # XenServer 8: v4.1.10 and later
    "4.1": Generation("4.1", CoalesceTrackerV41, plugin_calls_run_gc=True, plugin_waits_for_gc=True,
                      plugin_final_dry_run=True, keeps_vhd_parent=True, logs_fatal_errors=True),
}
DEFAULT_GENERATION = "3.2"


def get_generation(name):
    """The Generation called `name` ("3.2" or "4.1"); ValueError for any other."""
    try:
        return GENERATIONS[str(name)]
    except KeyError:
        raise ValueError("unknown SM generation {!r}: one of {}".format(
            name, ", ".join(sorted(GENERATIONS)))) from None
