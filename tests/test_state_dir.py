"""A state directory a run cannot write: `--now` (even `--dry-run`) stops before touching the host, with
one line naming the path and the cause and exit code 5; `--report` and the service's metrics go on.

Root ignores file modes, so the directory is made unwritable in ways root is refused too: a path under
a regular file, a read-only tmpfs, a full tmpfs, and the file-size limit (RLIMIT_FSIZE) of the process.
"""
import os
import resource
import subprocess

import pytest

from tests.agent_process import Agent, wait_for
from tests.runner_support import (REPOSITORY, agent_command, files, other_configs, power_states,
                                  run_now, small_scenario)
from tests.test_daemon import write_config
from tests.test_daemon_schedule import OPEN_WINDOW, set_mode

EXIT_STATE_DIR = 5


@pytest.fixture
def host(sim_host):
    return sim_host(small_scenario())


def use_state_dir(host, path):
    """Point the host's agent.conf at another state directory."""
    default = os.path.join(host.state_dir, "agent-state")
    with open(host.agent_conf) as stream:
        text = stream.read()
    assert "state_dir = {}\n".format(default) in text
    with open(host.agent_conf, "w") as stream:
        stream.write(text.replace("state_dir = {}\n".format(default), "state_dir = {}\n".format(path)))


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: mount a small tmpfs with `options` on a new directory; unmounted at teardown."""
    mounted = []

    def mount(options):
        target = str(tmp_path / "tmpfs{}".format(len(mounted)))
        os.mkdir(target)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", target],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if result.returncode != 0:
            pytest.skip("this machine cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): "
                        + result.stdout.strip())
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.call(["umount", target])


def assert_refused_before_anything(host, state_dir, cause, *args, **options):
    """`--now --dry-run` and `--now` both end with the one line and exit 5, the host untouched."""
    before = (files(host), other_configs(host), power_states(host))
    for extra in (("--dry-run",), ()):
        process = subprocess.Popen(agent_command(host, "--now", *(extra + args)), cwd=REPOSITORY,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                   preexec_fn=options.get("preexec_fn"))
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == EXIT_STATE_DIR, stderr
        assert stderr == "xcoalesce-agent: error: state directory {} cannot be written: {}\n".format(
            state_dir, cause), stderr
        assert stdout == ""
    assert (files(host), other_configs(host), power_states(host)) == before


def test_a_state_directory_under_a_file(host, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    state_dir = str(blocker / "state")
    use_state_dir(host, state_dir)
    assert_refused_before_anything(host, state_dir, "Not a directory")
    code = subprocess.call(agent_command(host, "--report"), cwd=REPOSITORY, stdout=subprocess.DEVNULL)
    assert code == 0


def test_a_state_directory_that_is_a_file(host, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.write_text("")
    use_state_dir(host, str(state_dir))
    assert_refused_before_anything(host, str(state_dir), "Not a directory")


def test_a_read_only_state_directory(host, tmpfs):
    state_dir = tmpfs("ro,size=1m")
    use_state_dir(host, state_dir)
    assert_refused_before_anything(host, state_dir, "Read-only file system")
    assert os.listdir(state_dir) == []


def test_a_full_state_directory(host, tmpfs):
    state_dir = tmpfs("size=64k")
    descriptor = os.open(os.path.join(state_dir, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(descriptor, bytes(4096))
    finally:
        os.close(descriptor)
    use_state_dir(host, state_dir)
    assert_refused_before_anything(host, state_dir, "No space left on device")
    assert os.listdir(state_dir) == ["filler"]


def small_file_size_limit(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_the_file_size_limit(host):
    state_dir = os.path.join(host.state_dir, "agent-state")
    assert_refused_before_anything(host, state_dir, "File too large", preexec_fn=small_file_size_limit(16384))


def test_a_run_log_grown_up_to_the_file_size_limit(host):
    state_dir = os.path.join(host.state_dir, "agent-state")
    limit = 1 << 20
    with open(os.path.join(state_dir, "runs.jsonl"), "wb") as stream:
        stream.write(b"\n" * (limit - 1000))
    assert_refused_before_anything(
        host, state_dir, "runs.jsonl ({} bytes) is near the file-size limit of {} bytes".format(limit - 1000, limit),
        preexec_fn=small_file_size_limit(limit))


def test_the_service_serves_metrics_with_an_unusable_state_directory(host, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    use_state_dir(host, str(blocker / "state"))
    set_mode(host, "auto", windows=OPEN_WINDOW)
    with Agent(write_config(host, tmp_path / "agent.conf")) as agent:
        metrics = agent.wait_for_metric("xcoalesce_sr_reclaimable_bytes")
        assert [value for _, value in metrics["xcoalesce_history_corrupt_lines"]] == [0]
        assert sum(value for _, value in metrics["xcoalesce_reclaimed_bytes_total"]) == 0
        wait_for(lambda: "cannot be written: Not a directory" in agent.stderr(), what="the scheduled run refused")
        assert agent.metrics()["xcoalesce_sr_reclaimable_bytes"]
        assert "Traceback" not in agent.stderr()


def test_a_usable_state_directory_runs(host):
    code, document, stderr = run_now(host, "--dry-run")
    assert code == 0 and document["runs"], stderr
    assert ".write-probe" not in os.listdir(os.path.join(host.state_dir, "agent-state"))
