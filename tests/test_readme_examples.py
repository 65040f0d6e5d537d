"""README.md's examples are what the agent prints: each fenced block that starts with `$ xcoalesce-agent`
is run, with the same arguments, against a simulated `demo` host, and the `make demo` excerpt against a
real `python -m tests.dom0sim demo`.

An example matches its real output line by line (trailing blanks aside), a line `...` standing for any
lines skipped. Only what changes from run to run is normalised: the demo's temporary directory, the
FROZEN column of a `--now` result, the seconds an inspection took, and the port the service listens on.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.agent_process import free_port, wait_for
from tests.dom0sim.host import SimHost

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPOSITORY, "README.md")
SERVED = "python -m tests.dom0sim serve --state /tmp/xc-sim --scenario demo"
README_CONFIG = "/tmp/xc-sim/agent.conf"
ELISION = "..."

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_CURL = re.compile(r"^curl -s (?P<url>\S+) \| grep '(?P<pattern>[^']*)'$")
_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+:\d+$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_DEMO_DIR = re.compile(r"/tmp/xcoalesce-demo-[^/\s]+")
_INSPECTED_IN = re.compile(r"^(INFO: inspected \d+ SRs? in )\d+(?:\.\d+)? s: ")


def read_readme():
    with open(README, encoding="utf-8") as stream:
        return stream.read()


def fenced_blocks():
    return [block.splitlines() for block in _FENCE.findall(read_readme())]


def commands(block):
    """[(command line without `$ `, the lines shown after it)] of a block of terminal examples."""
    found = []
    for line in block:
        if line.startswith("$ "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return found


def agent_examples():
    return [commands(block) for block in fenced_blocks() if block and block[0].startswith("$ xcoalesce-agent ")]


def demo_example():
    blocks = [block for block in fenced_blocks() if "SR usage before:" in block]
    assert len(blocks) == 1, "the README shows one `make demo` excerpt"
    return blocks[0]


def shows(example, output):
    """Whether `example` is `output`: the same lines, `...` standing for any lines skipped (none at the
    start or the end of the example unless it starts or ends with `...`)."""
    example = [line.rstrip() for line in example]
    output = [line.rstrip() for line in output]
    segments = [[]]
    for line in example:
        if line.strip() == ELISION:
            segments.append([])
        else:
            segments[-1].append(line)
    if len(segments) == 1:
        return example == output
    head, middle, tail = segments[0], segments[1:-1], segments[-1]
    if output[:len(head)] != head:
        return False
    position = len(head)
    for segment in middle:
        while output[position:position + len(segment)] != segment:
            if position + len(segment) > len(output):
                return False
            position += 1
        position += len(segment)
    return len(output) - len(tail) >= position and output[len(output) - len(tail):] == tail


@pytest.mark.parametrize("example, output, matches", [
    (["a", "b"], ["a", "b"], True),
    (["a", "b"], ["a", "b", "c"], False),
    (["a  ", "b"], ["a", "b  "], True),
    (["...", "c"], ["a", "b", "c"], True),
    (["...", "b"], ["a", "b", "c"], False),
    (["a", "...", "c"], ["a", "b", "b", "c"], True),
    (["a", "...", "c", "d", "..."], ["a", "c", "x", "c", "d", "e"], True),
    (["a", "...", "d", "...", "c"], ["a", "c", "d"], False),
    (["a", "...", "b"], ["a"], False),
    (["a", "...", "a"], ["a"], False),
])
def test_an_elision_stands_for_any_lines_skipped(example, output, matches):
    assert shows(example, output) is matches


def same(example, output):
    """An assert message that shows both sides."""
    return "the README shows:\n{}\n\nthe agent printed:\n{}".format("\n".join(example), "\n".join(output))


@pytest.fixture(scope="module")
def readme_host(tmp_path_factory):
    """The `demo` host the README's examples ran against; no example changes it."""
    host = SimHost(str(tmp_path_factory.mktemp("xc-sim")), "demo").build().start()
    yield host
    host.stop()


def agent_arguments(command, host):
    """The arguments of an `xcoalesce-agent` example, its config the simulated host's."""
    words = shlex.split(command)
    assert words[:3] == ["xcoalesce-agent", "--config", README_CONFIG], command
    return ["--config", host.agent_conf] + words[3:]


def test_the_examples_ran_against_the_served_demo_host():
    assert SERVED in read_readme()
    examples = agent_examples()
    shown = sorted(shlex.split(example[0][0])[3] for example in examples)
    assert shown == ["--now", "--repair", "--report", "--web.listen-address"], shown


@pytest.mark.parametrize("example", [example for example in agent_examples() if len(example) == 1],
                         ids=lambda example: example[0][0].split(README_CONFIG)[-1].strip())
def test_a_command_prints_what_the_readme_shows(readme_host, example):
    command, shown = example[0]
    process = subprocess.Popen([sys.executable, "-m", "xcoalesce_agent"] + agent_arguments(command, readme_host),
                               cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True)
    output = process.communicate(timeout=120)[0].splitlines()
    assert process.returncode == 0, "\n".join(output)
    assert shows(shown, output), same(shown, output)


def service_example():
    """(the service's arguments, the log lines shown, the curl URL, its grep pattern, the lines shown)."""
    examples = [example for example in agent_examples() if len(example) > 1]
    assert len(examples) == 1, "the README shows the service in one example"
    (service, logged), (curl, scraped) = examples[0]
    words = shlex.split(service)
    assert words[-1] == "&" and _ADDRESS.match(words[words.index("--web.listen-address") + 1]), service
    match = _CURL.match(curl)
    assert match, curl
    return service[:-1].strip(), logged, match.group("url"), match.group("pattern"), scraped


def log_lines(path):
    with open(path) as stream:
        return [_INSPECTED_IN.sub(r"\1<seconds> s: ", line) for line in stream.read().splitlines()]


def test_the_service_logs_and_serves_what_the_readme_shows(readme_host, tmp_path):
    service, logged, url, pattern, scraped = service_example()
    arguments = agent_arguments(service, readme_host)
    shown_address = arguments[arguments.index("--web.listen-address") + 1]
    address = "127.0.0.1:{}".format(free_port())
    arguments[arguments.index(shown_address)] = address
    logged = [_INSPECTED_IN.sub(r"\1<seconds> s: ", line.replace(shown_address, address)) for line in logged]
    log_path = str(tmp_path / "service.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "xcoalesce_agent"] + arguments, cwd=REPOSITORY,
                                   stdout=log, stderr=subprocess.STDOUT)

    def scrape():
        """The served lines the grep keeps, once the first inspection is served."""
        assert process.poll() is None, "the service exited:\n" + "\n".join(log_lines(log_path))
        try:
            with urllib.request.urlopen(url.replace(shown_address, address), timeout=10) as response:
                body = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError):
            return None
        return [line for line in body.splitlines() if re.search(pattern, line)]

    try:
        served = wait_for(scrape, timeout=60, what="{} on {}".format(pattern, address))
        try:
            wait_for(lambda: shows(logged, log_lines(log_path)), timeout=10, what="the service's log lines")
        except AssertionError:
            pass
        assert shows(logged, log_lines(log_path)), same(logged, log_lines(log_path))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert scraped and set(scraped) <= set(served), same(scraped, served)
    assert process.returncode == 0


def normalise_demo(line):
    """The demo's output without what changes from run to run: its temporary directory, and the FROZEN
    cell of a `--now` result row (the row's cells then a single blank apart)."""
    line = _DEMO_DIR.sub("<demo-dir>", line)
    cells = re.split(r"\s{2,}", line.strip())
    if len(cells) >= 8 and _UUID.match(cells[0]) and re.match(r"^\d+\.\d\d s$", cells[5]):
        return " ".join(cells[:5] + ["<frozen>"] + cells[6:])
    if cells[:8] == ["VDI", "VM", "STRATEGY", "PREDICTED", "ESTIMATED", "FROZEN", "RECLAIMED", "RESULT"]:
        return " ".join(cells)
    return line


def test_make_demo_prints_what_the_readme_shows():
    shown = demo_example()
    process = subprocess.Popen([sys.executable, "-m", "tests.dom0sim", "demo"], cwd=REPOSITORY,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    output = process.communicate(timeout=300)[0].splitlines()
    assert process.returncode == 0, "\n".join(output)
    assert shows([normalise_demo(line) for line in shown], [normalise_demo(line) for line in output]), \
        same(shown, output)
