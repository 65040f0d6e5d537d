"""`xcoalesce-agent`: argument parsing, logging, exit codes and the wiring of the three modes.

`--report` inspects and prints; `--now` runs leaf coalesces (runner.py); `--repair` undoes what
interrupted runs left (journal and marks); nothing runs the daemon.
Every AgentError becomes one line `xcoalesce-agent: error: ...` and its exit code.
"""
import argparse
import logging
import os
import signal
import sys

from . import __version__, config as config_module, progress, stopping
from .errors import AgentError, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from .printable import OneLineFormatter, one_line

PROG = "xcoalesce-agent"
LOG_FORMAT = "%(levelname)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors say `xcoalesce-agent: error: ...` and exit 2, like the rest."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, "{}: error: {}\n".format(self.prog, message))


def build_parser():
    parser = _Parser(prog=PROG, description="Reclaims the space deleted VM snapshots leave behind on "
                     "XenServer / XCP-ng storage, and exports it to Prometheus. Without --report or "
                     "--now it runs as the service.")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default {})".format(config_module.DEFAULT_PATH))
    parser.add_argument("--log-level", choices=config_module.LOG_LEVELS,
                        help="overrides [agent] log_level")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report", action="store_true", help="inspect this host's SRs and print what is reclaimable")
    mode.add_argument("--now", action="store_true", help="leaf-coalesce the eligible VDIs now")
    mode.add_argument("--repair", action="store_true", help="undo what interrupted runs left on the host "
                      "(flags, suspended VMs), from the journal and from the agent's marks in xapi")
    parser.add_argument("--json", action="store_true", help="with --report, --now or --repair: print JSON")
    parser.add_argument("--dry-run", action="store_true", help="with --now: say what would be done")
    parser.add_argument("--vm", dest="vms", action="append", default=[], metavar="UUID",
                        help="with --now: only this VM (repeatable)")
    parser.add_argument("--sr", dest="srs", action="append", default=[], metavar="UUID",
                        help="with --now: only this SR (repeatable)")
    parser.add_argument("--max-freeze-seconds", metavar="S",
                        help="with --now: longest I/O freeze allowed (default from the configuration)")
    parser.add_argument("--web.listen-address", dest="web_listen_address", metavar="ADDR:PORT",
                        help="service mode: where /metrics listens (default from the configuration)")
    return parser


def parse_args(argv):
    """Parse and check which options go with which mode."""
    parser = build_parser()
    args = parser.parse_args(argv)
    only_now = [("--dry-run", args.dry_run), ("--vm", args.vms), ("--sr", args.srs),
                ("--max-freeze-seconds", args.max_freeze_seconds is not None)]
    for flag, given in only_now:
        if given and not args.now:
            parser.error("{} goes with --now".format(flag))
    if args.json and not (args.report or args.now or args.repair):
        parser.error("--json goes with --report, --now or --repair")
    if args.web_listen_address is not None:
        if args.report or args.now or args.repair:
            parser.error("--web.listen-address is for the service mode (no --report, --now or --repair)")
        try:
            config_module.listen_address(args.web_listen_address)
        except ValueError as error:
            parser.error("--web.listen-address: {}".format(error))
    if args.max_freeze_seconds is not None:
        try:
            args.max_freeze_seconds = config_module.parse_value("coalesce", "max_freeze_seconds",
                                                                args.max_freeze_seconds)
        except ValueError as error:
            parser.error("--max-freeze-seconds: {}".format(error))
    return args


def setup_logging(level):
    """Log to stderr (the journal, under systemd), which adds its own timestamps; one line a record,
    whatever names from xapi or files it holds."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def setup_progress(config, service):
    """Progress on stderr: redrawn in place on a terminal, else (and always for the service) INFO
    lines every progress_log_seconds."""
    if sys.stderr.isatty() and not service:
        reporter = progress.install(progress.TerminalProgress(sys.stderr))
        for handler in logging.getLogger().handlers:
            handler.addFilter(reporter)
    else:
        progress.install(progress.LogProgress(config.agent.progress_log_seconds))


def report(config, as_json):
    from .inspect import inspection, report as report_module
    try:
        result = inspection.inspect(config)
    finally:
        progress.done()
    sys.stdout.write(report_module.render_json(result) if as_json else report_module.render_text(result))
    for error in result.errors or ():
        logging.warning("%s: %s", error["stage"], error["message"])
    return EXIT_OK


def dispatch(args):
    config = config_module.load(args.config)
    setup_logging(args.log_level or config.agent.log_level)
    setup_progress(config, service=not (args.report or args.now or args.repair))
    try:
        return run_mode(config, args)
    finally:
        progress.done()


def run_mode(config, args):
    if args.report:
        return report(config, args.json)
    if args.now:
        from .reclaim import runner
        # `systemctl stop` of the timer's unit: end the current step, undo it, begin no other.
        signal.signal(signal.SIGTERM, lambda number, frame: stopping.request())
        code = runner.run_now(config, args)
        if stopping.requested():
            sys.stderr.write("{}: error: stopped by SIGTERM after undoing the step under way\n".format(PROG))
            return EXIT_INTERRUPTED
        return code
    if args.repair:
        from .reclaim import repair
        return repair.run_repair(config, args.json)
    from . import daemon
    return daemon.run(config, args.web_listen_address)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(args)
    except AgentError as error:
        sys.stderr.write("{}: error: {}\n".format(PROG, one_line(error.message)))
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("{}: error: interrupted\n".format(PROG))
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `--report | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
