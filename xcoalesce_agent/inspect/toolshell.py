"""One small `/bin/sh` through which an inspection runs its tools, one command after another.

Forking the agent for each tool run costs it more than the fork: a fork write-protects every page
of the agent (tens of MB at 10,000 VDIs), and each page written afterwards faults back in, some
30,000 faults and a tenth of a second of system CPU per inspection (more in a PV Dom0, where page
tables are the hypervisor's). The shell is forked once, while it is small, and forks the tools. Each
command's output and errors go to two unnamed temporary files (the shell reopens them, truncated,
through /proc/self/fd: no name anywhere, so nothing is left behind whatever ends the agent); its
exit status comes back as one line on a pipe, waited for with a deadline.
"""
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import weakref

# Each command is also an audit event (Python >= 3.8), as a process the agent started itself would be.
_audit = getattr(sys, "audit", lambda event, *args: None)
AUDIT_EVENT = "xcoalesce_agent.tool"

# $1, $2: the files for each command's stdout and stderr (truncated by each redirection). A command
# reads no stdin (the pipe of commands).
_LOOP = 'while IFS= read -r c; do eval "$c" </dev/null >"$1" 2>"$2"; echo "$?"; done'


class ToolShellError(Exception):
    """The shell could not run a command (no temporary file, a word it cannot pass, it died)."""


class ToolShell(object):
    """Runs commands through one shell; `started` counts the shells started (processes forked)."""

    def __init__(self, environment):
        self.environment = environment
        self.started = 0
        self._shell = None

    def run(self, command, timeout):
        """(status, stdout, stderr) of `command` (a list of words), its status as the shell says it (a
        command a signal ended: 128 + its number), or None when it outlasted `timeout` seconds:
        then the shell and the command are killed, and the next run starts another shell."""
        if any("\n" in word or "\0" in word for word in command):
            raise ToolShellError("cannot pass a word holding a line break to {}".format(command[0]))
        shell = self._running_shell()
        _audit(AUDIT_EVENT, command)
        line = (" ".join(shlex.quote(word) for word in command) + "\n").encode("utf-8", "surrogateescape")
        try:
            while line:
                line = line[os.write(shell.stdin, line):]
            status = shell.status(timeout)
        except OSError as error:
            self.close()
            raise ToolShellError("the shell running {} ended: {}".format(
                command[0], os.strerror(error.errno))) from None
        if status is None:
            self.close()
            return None
        return status, shell.read("out"), shell.read("err")

    def start(self):
        """Starts the shell unless one runs."""
        self._running_shell()

    def _running_shell(self):
        if self._shell is None or self._shell.process.poll() is not None:
            self.close()
            self._shell = _Shell(self.environment)
            self.started += 1
        return self._shell

    def close(self):
        shell, self._shell = self._shell, None
        if shell is not None:
            shell.finalizer()


class _Shell(object):
    def __init__(self, environment):
        self.files = {}
        try:
            for name in ("out", "err"):
                self.files[name] = tempfile.TemporaryFile(prefix="xcoalesce-tools-")
        except OSError as error:
            _close(self.files.values())
            raise ToolShellError("cannot create a temporary file for the tools' output: {}".format(
                os.strerror(error.errno) if error.errno else error)) from None
        descriptors = [self.files[name].fileno() for name in ("out", "err")]
        try:
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", _LOOP, "sh"] + ["/proc/self/fd/{}".format(fd) for fd in descriptors],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=environment,
                close_fds=True, pass_fds=descriptors, start_new_session=True)
        except OSError:
            _close(self.files.values())
            raise
        self.stdin, self.stdout = self.process.stdin.fileno(), self.process.stdout.fileno()
        self.pending = b""
        self.finalizer = weakref.finalize(self, _end, self.process, list(self.files.values()))

    def status(self, timeout):
        """The exit status line of the command sent last, or None past `timeout`."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.stdout, 64)
            if not chunk:
                raise OSError(32, os.strerror(32))  # EPIPE: the shell is gone
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return int(line)

    def read(self, name):
        stream = self.files[name]
        stream.seek(0)
        return stream.read()


def _close(streams):
    for stream in streams:
        stream.close()


def _end(process, files):
    """Ends a shell and whatever command still runs in it (its process group); closes its files."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            pass
    _close((process.stdin, process.stdout))
    process.wait()
    _close(files)
