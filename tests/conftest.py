"""Fixtures that run a simulated Dom0 (tests/dom0sim) for a test, in its tmp_path."""
import shutil

import pytest

from tests.dom0sim.host import SimHost
from tests.dom0sim.sm import DEFAULT_GENERATION
from tests.dom0sim.xapi import client


def pytest_generate_tests(metafunc):
    """A test module that sets `SM_GENERATIONS = ("3.2", "4.1")` runs each of its simulated hosts' tests
    against each of those SM generations."""
    generations = getattr(metafunc.module, "SM_GENERATIONS", None)
    if generations and "sm_generation" in metafunc.fixturenames:
        metafunc.parametrize("sm_generation", generations, indirect=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Notes on the test whether its body passed, for fixtures to keep what a failure leaves."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.body_passed = report.passed


@pytest.fixture
def sm_generation(request):
    """The SM generation sim_host gives its hosts unless `sm=` says: the default one, or each of a
    module's SM_GENERATIONS."""
    return getattr(request, "param", DEFAULT_GENERATION)


@pytest.fixture
def sim_host(tmp_path, sm_generation, request):
    """Factory: sim_host("demo", **params) or sim_host(scenario_dict) builds and starts a simulated host
    under tmp_path (SM generation `sm_generation` unless `sm=` says, UUIDs salted with its directory:
    tests/dom0sim/hostbuild.py); every host it started is stopped at teardown, and its directory (disk
    images: gigabytes over the suite, which pytest would keep for three runs) removed once the test
    passed."""
    hosts = []

    def start(scenario="demo", **params):
        params.setdefault("sm", sm_generation)
        directory = str(tmp_path / "h{}".format(len(hosts)))
        host = SimHost(directory, scenario, uuid_salt=directory, **params).build()
        hosts.append(host)
        return host.start()

    yield start
    for host in hosts:
        host.stop()
    if getattr(request.node, "body_passed", False):
        for host in hosts:
            shutil.rmtree(host.state_dir, ignore_errors=True)


@pytest.fixture
def demo_host(sim_host):
    return sim_host("demo")


@pytest.fixture
def states_host(sim_host):
    return sim_host("states")


@pytest.fixture
def xapi_session():
    """Factory: xapi_session(host) is a logged-in real XenAPI session on the host's socket."""
    sessions = []

    def connect(host):
        session = client.connect(host.socket_path)
        sessions.append(session)
        return session

    yield connect
    for session in sessions:
        try:
            session.xenapi.session.logout()
        except Exception:  # the host may be gone already; nothing to log out from
            pass
