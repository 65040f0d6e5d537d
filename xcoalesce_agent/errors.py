"""Errors that reach the user as one line and a defined exit code (docs/operations.md, "Exit codes")."""

EXIT_OK = 0
EXIT_RUNS_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_LOCK_HELD = 4
EXIT_STATE_DIR = 5
EXIT_INTERRUPTED = 130


class AgentError(Exception):
    """An error the user can act on; `cli.main` prints `message` and exits with `exit_code`."""

    exit_code = EXIT_RUNS_FAILED

    def __init__(self, message):
        super(AgentError, self).__init__(message)
        self.message = message

    def __str__(self):
        return self.message


class ConfigError(AgentError):
    """The configuration file or the command line is wrong."""

    exit_code = EXIT_USAGE


class HostUnreachable(AgentError):
    """xapi or the host tools (`vhd-util`) cannot be reached."""

    exit_code = EXIT_UNREACHABLE


class LockHeld(AgentError):
    """Another run already holds the host lock."""

    exit_code = EXIT_LOCK_HELD


class StateDirUnusable(AgentError):
    """The state directory (`[agent] state_dir`) cannot be written: nothing is done on the host."""

    exit_code = EXIT_STATE_DIR
