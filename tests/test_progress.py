"""Progress of long steps: the pure part (lines, throttling on an injected clock), then the agent
against the simulated host, its stderr on a pseudo-terminal (one line redrawn, cleared at the end)
and on a pipe (periodic log lines during a GC held at its merge, no control sequences)."""
import io
import os
import queue
import subprocess
import threading

from tests.runner_support import REPOSITORY, agent_command, configure, small_scenario
from xcoalesce_agent import progress


class FakeClock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Lines(object):
    """A logger stand-in that keeps the lines logged at INFO."""

    def __init__(self):
        self.lines = []

    def info(self, form, *args):
        self.lines.append(form % args)


# ---- the pure part ------------------------------------------------------------------------------

def test_a_line_holds_the_step_its_fraction_and_what_is_known():
    assert progress.format_line("inspecting SR 3/12 local") == "inspecting SR 3/12 local"
    assert progress.format_line("waiting for the GC of SR lvm", 0.4, "25 s of at most 3600 s") == \
        "waiting for the GC of SR lvm: 40%, 25 s of at most 3600 s"
    assert progress.format_line("x", 1.7) == "x: 100%"
    assert progress.waited(25.4, 3600) == "25 s of at most 3600 s"
    assert progress.time_left(30.0, 0.25) == 90.0
    assert progress.time_left(30.0, 0.0) is None


def test_the_throttle_lets_one_through_per_interval():
    clock = FakeClock()
    throttle = progress.Throttle(1.0, clock)
    assert throttle.due()
    assert not throttle.due()
    clock.now += 0.99
    assert not throttle.due()
    clock.now += 0.02
    assert throttle.due()


def test_a_terminal_line_is_redrawn_in_place_at_most_a_few_times_a_second_and_cleared():
    clock, stream = FakeClock(), io.StringIO()
    shown = progress.TerminalProgress(stream, clock, width=40)
    shown.step("inspecting SR 1/2 local\x1b[31m")
    shown.update(0.5)  # too soon after the step: not drawn
    clock.now += progress.REDRAW_SECONDS
    shown.update(0.5, "a detail long enough to be cut at the terminal's width")
    shown.done()
    shown.done()  # nothing drawn since: nothing written
    lines = stream.getvalue().split(progress.CLEAR_LINE)
    assert lines[0] == "" and lines[-1] == ""
    assert lines[1] == "inspecting SR 1/2 local\\x1b[31m"
    assert len(lines) == 4 and len(lines[2]) <= 39 and lines[2].startswith("inspecting SR 1/2")


def test_off_a_terminal_a_line_is_logged_once_a_step_has_lasted_the_interval():
    clock, log = FakeClock(), Lines()
    logged = progress.LogProgress(30, clock, log)
    logged.step("waiting for the GC of SR lvm")
    logged.update(None, "1 s of at most 3600 s")
    clock.now += 30
    logged.update(0.5, "30 s of at most 3600 s")
    clock.now += 10
    logged.update(0.6, "40 s of at most 3600 s")
    logged.done()
    assert log.lines == ["waiting for the GC of SR lvm: 50%, 30 s of at most 3600 s"]
    for number in range(1, 4):  # steps alone (an inspection's SRs) log too, once per interval
        logged.step("inspecting SR {}/3".format(number))
        clock.now += 20
    assert log.lines[1:] == ["inspecting SR 3/3"]


# ---- the agent on a terminal and off one -------------------------------------------------------

def set_progress_log_seconds(host, seconds):
    with open(host.agent_conf) as stream:
        text = stream.read()
    with open(host.agent_conf, "w") as stream:
        stream.write(text.replace("[agent]\n", "[agent]\nprogress_log_seconds = {}\n".format(seconds), 1))


def start(host, stderr, *args):
    return subprocess.Popen(agent_command(host, *args), cwd=REPOSITORY, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr)


def read_all(descriptor, chunks):
    """Read a pty's master into `chunks` until its slave is closed everywhere."""
    while True:
        try:
            data = os.read(descriptor, 4096)
        except OSError:
            return
        if not data:
            return
        chunks.put(data)


def on_pty(host, *args, **gate):
    """Run the agent with stderr on a pseudo-terminal: (exit code, stdout, what the terminal got).
    `held` (a gate) is released once the terminal shows `until`."""
    master, slave = os.openpty()
    agent = start(host, slave, *args)
    os.close(slave)
    chunks, seen = queue.Queue(), b""
    reader = threading.Thread(target=read_all, args=(master, chunks))
    reader.start()
    held = gate.get("held")
    try:
        if held is not None:
            assert held.wait_reached(60)
            while gate["until"] not in seen:
                seen += chunks.get(timeout=60)
            held.release()
        stdout, _ = agent.communicate(timeout=120)
        reader.join(60)
    finally:
        if held is not None:
            held.release()
        os.close(master)
    while not chunks.empty():
        seen += chunks.get()
    return agent.returncode, stdout, seen


def test_report_on_a_terminal_shows_each_sr_and_clears_the_line(sim_host):
    host = sim_host(small_scenario())
    code, stdout, terminal = on_pty(host, "--report")
    assert code == 0
    assert b"inspecting SR 1/2 " in terminal and b"inspecting SR 2/2 " in terminal
    last = terminal.rindex(b"inspecting SR 2/2 ")
    assert progress.CLEAR_LINE.encode() in terminal[last:]
    assert terminal.endswith(progress.CLEAR_LINE.encode()) or b"\r\n" in terminal[last:]
    assert b"\x1b" not in stdout and b"\r" not in stdout


def test_now_on_a_terminal_shows_the_gc_it_waits_for_and_clears_the_line(sim_host):
    host = sim_host(small_scenario())
    configure(host, strategies="gc")
    merging = host.sm.gate("gc.before-merge")
    code, stdout, terminal = on_pty(host, "--now", "--sr", host.srs["local"], held=merging,
                                    until=b"of at most 3600 s")
    assert code == 0, terminal
    assert b"\r\x1b[Kwaiting for the GC of SR local" in terminal
    last = terminal.rindex(b"of at most 3600 s")
    assert progress.CLEAR_LINE.encode() in terminal[last:]
    assert b"\x1b" not in stdout


def test_off_a_terminal_a_held_gc_is_logged_periodically_without_control_sequences(sim_host):
    host = sim_host(small_scenario())
    configure(host, strategies="gc")
    set_progress_log_seconds(host, 1)
    merging = host.sm.gate("gc.before-merge")
    agent = start(host, subprocess.PIPE, "--now", "--json", "--sr", host.srs["local"])
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in agent.stderr])
    reader.start()
    seen = []
    try:
        assert merging.wait_reached(60)
        while not any(b"INFO: waiting for the GC of SR local" in line for line in seen):
            seen.append(lines.get(timeout=60))
    finally:
        merging.release()
    stdout = agent.stdout.read()
    agent.wait(120)
    reader.join(60)
    while not lines.empty():
        seen.append(lines.get())
    stderr = b"".join(seen)
    assert agent.returncode == 0, stderr
    assert b"of at most 3600 s" in stderr
    assert b"\r" not in stderr and b"\x1b" not in stderr and b"\x1b" not in stdout
