"""The agent's service mode as a real process, and scraping it, for the exporter's end-to-end tests."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A TCP port nobody listens on right now."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def wait_for(check, timeout=20.0, interval=0.1, what="condition"):
    """Poll `check()` until it returns something true; fail with `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.time() > deadline:
            raise AssertionError("timed out after {:.0f} s waiting for {}".format(timeout, what))
        time.sleep(interval)


def parse(text):
    """{sample name: [(labels, value)]} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


class Agent(object):
    """`python -m xcoalesce_agent --config PATH` in service mode, serving on 127.0.0.1:PORT."""

    def __init__(self, config_path, port=None, override_address=True):
        self.config_path = config_path
        self.port = port or free_port()
        self.process = None
        self._override = override_address
        self._stderr_path = config_path + ".{}.stderr".format(self.port)

    def start(self):
        command = [sys.executable, "-m", "xcoalesce_agent", "--config", self.config_path]
        if self._override:
            command += ["--web.listen-address", "127.0.0.1:{}".format(self.port)]
        self._stderr = open(self._stderr_path, "w")
        self.process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=self._stderr)
        return self

    def url(self, path="/metrics", port=None):
        return "http://127.0.0.1:{}{}".format(port or self.port, path)

    def get(self, path="/metrics", port=None):
        """The body, or None while nothing answers."""
        try:
            with urllib.request.urlopen(self.url(path, port), timeout=5) as response:
                return response.read().decode("utf-8")
        except (urllib.error.URLError, OSError):
            return None

    def metrics(self, port=None):
        text = self.get(port=port)
        return parse(text) if text is not None else None

    def wait_for_metric(self, name, timeout=20.0, port=None):
        """The parsed metrics once `name` has a sample."""
        def check():
            if self.process.poll() is not None:
                raise AssertionError("the agent exited with {}: {}".format(self.process.returncode, self.stderr()))
            found = self.metrics(port)
            return found if found and found.get(name) else None
        return wait_for(check, timeout, what="{} on {}".format(name, self.url(port=port)))

    def signal(self, number):
        self.process.send_signal(number)

    def wait(self, timeout=15.0):
        return self.process.wait(timeout)

    def stderr(self):
        self._stderr.flush()
        with open(self._stderr_path) as stream:
            return stream.read()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._stderr.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
