"""The simulated Dom0 from the command line.

    python -m tests.dom0sim serve --state DIR --scenario NAME [--param KEY=VALUE ...] [--sm 3.2|4.1]
    python -m tests.dom0sim demo [--sm 3.2|4.1]
    python -m tests.dom0sim list
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from tests.dom0sim import scenarios, smgenerations
from tests.dom0sim.host import SimHost

MIB = 1024 * 1024
PROG = "python -m tests.dom0sim"


class UsageError(Exception):
    """Bad input from the command line: one line on stderr, exit 2."""


def parse_param(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError("--param expects KEY=VALUE, got {!r}".format(text))
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, value


def build_host(state_dir, name, params, generation=smgenerations.DEFAULT_GENERATION):
    if os.path.isdir(state_dir) and os.listdir(state_dir):
        raise UsageError("state directory {} is not empty".format(state_dir))
    try:
        return SimHost(state_dir, name, sm=generation, **params).build()
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    except TypeError as exc:
        raise UsageError("scenario {}: {}".format(name, exc)) from None


def serve(args):
    """Build the scenario under --state and serve it until SIGTERM or SIGINT."""
    host = build_host(os.path.abspath(args.state), args.scenario, dict(parse_param(p) for p in args.param), args.sm)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    host.start()
    try:
        print(host.describe())
        print("serving; stop with SIGTERM or Ctrl-C", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        host.stop()
    print("stopped", flush=True)
    return 0


def sr_usage(host):
    rows = []
    for key in sorted(host.srs):
        record = host.db.get("SR", host.sr_ref(key))
        rows.append((record["name_label"], record["type"], int(record["physical_size"]),
                     int(record["physical_utilisation"])))
    return rows


def print_usage_table(title, rows):
    print(title)
    print("  {:<16} {:<10} {:>10} {:>10} {:>10}".format("SR", "type", "size MiB", "used MiB", "free MiB"))
    for name, sr_type, size, used in rows:
        print("  {:<16} {:<10} {:>10.1f} {:>10.1f} {:>10.1f}".format(name, sr_type, size / MIB, used / MIB,
                                                                    (size - used) / MIB))


def run_agent(host, *arguments):
    """Run the agent's command line against the host and show what it prints."""
    command = [sys.executable, "-m", "xcoalesce_agent", "--config", host.agent_conf] + list(arguments)
    print("\n$ xcoalesce-agent --config {} {}".format(host.agent_conf, " ".join(arguments)), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    output, _ = process.communicate()
    sys.stdout.write(output)
    print("[exit {}]".format(process.returncode), flush=True)
    return process.returncode


def demo(args):
    """Build the demo host in a temporary directory, let the agent report, reclaim and report again."""
    state_dir = tempfile.mkdtemp(prefix="xcoalesce-demo-")
    try:
        host = build_host(state_dir, "demo", {}, args.sm)
        host.start()
        try:
            print(host.describe())
            before = sr_usage(host)
            print()
            print_usage_table("SR usage before:", before)
            run_agent(host, "--report")
            run_agent(host, "--now")
            host.sm.wait_idle(120)
            run_agent(host, "--report")
            after = sr_usage(host)
            print()
            print_usage_table("SR usage after:", after)
            freed = sum(b[3] for b in before) - sum(a[3] for a in after)
            print("\nfreed {:.1f} MiB".format(freed / MIB))
        finally:
            host.stop()
    finally:
        if args.keep:
            print("state kept in {}".format(state_dir))
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


def list_scenarios(args):
    for name in scenarios.names():
        doc = " ".join((scenarios.SCENARIOS[name].__doc__ or "").split())
        print("{:<12} {}".format(name, doc))
    return 0


def add_sm_option(command):
    command.add_argument("--sm", choices=sorted(smgenerations.GENERATIONS), default=smgenerations.DEFAULT_GENERATION,
                         help="the storage manager's generation: 3.2 as XCP-ng 8.3 (default), 4.1 as XenServer 8")


def parser():
    top = argparse.ArgumentParser(prog=PROG, description="A simulated XenServer / XCP-ng Dom0.")
    commands = top.add_subparsers(dest="command")
    serve_cmd = commands.add_parser("serve", help="build a scenario and serve it until stopped")
    serve_cmd.add_argument("--state", required=True, metavar="DIR", help="an empty or new directory")
    serve_cmd.add_argument("--scenario", default="demo", help="one of: " + ", ".join(scenarios.names()))
    serve_cmd.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                           help="a scenario parameter, e.g. count=2000 for large")
    add_sm_option(serve_cmd)
    serve_cmd.set_defaults(run=serve)
    demo_cmd = commands.add_parser("demo", help="the agent against the demo host, before and after")
    demo_cmd.add_argument("--keep", action="store_true", help="keep the state directory")
    add_sm_option(demo_cmd)
    demo_cmd.set_defaults(run=demo)
    list_cmd = commands.add_parser("list", help="the scenarios")
    list_cmd.set_defaults(run=list_scenarios)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    if not getattr(args, "run", None):
        parser().print_usage(sys.stderr)
        return 2
    try:
        return args.run(args)
    except UsageError as exc:
        sys.stderr.write("{}: error: {}\n".format(PROG, exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
