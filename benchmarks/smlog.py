"""The SMlog reader's cost: a first read of a 100 MiB SMlog and an incremental read of 1 MiB of new lines;
and a read of 10 MiB of hostile lines (the first words of the reader's rules repeated through 60 KB lines),
whose cost per MiB must stay of the order of an ordinary log's: each line is looked at within bounded
stretches, never again and again.

Targets (Python 3.6): under 2 s and 50 ms of CPU, peak RSS up by less than 5 MB; `grep -c` over the same
file is the baseline. The file mixes SM's lines (most of SMlog) with GC runs that merge, give up, lack
space and fail, as a busy host writes them. Each figure is measured in a fresh process, so that peak RSS
is the reader's own.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
FIRST_READ_BYTES = 100 * MIB
INCREMENT_BYTES = 1 * MIB
VDIS = 2000   # leaves the GC works on, again and again
# The targets: first read CPU s, incremental read CPU s, peak RSS increase MB (of either read).
TARGET_FIRST_CPU = 2.0
TARGET_INCREMENT_CPU = 0.050
TARGET_RSS_MB = 5.0

MEASURE = """
import json, resource, sys, time
from xcoalesce_agent import config
from xcoalesce_agent.inspect import smlogfile
conf = config.load(sys.argv[1])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu, wall = time.process_time(), time.monotonic()
log, health = smlogfile.read(conf)
print(json.dumps({"cpu": time.process_time() - cpu, "wall": time.monotonic() - wall,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss,
                  "bytes": health["bytes_read"],
                  "runs": sum(sr.get("runs_total", 0) for sr in log.state["srs"].values())}))
"""


def block(number, sr):
    """One GC run on SR `sr` and the SM chatter around it, as lines."""
    stamp = time.strftime("%b %d %H:%M:%S", time.localtime(1767369600 + number))
    pid, child = 3000000 + number * 3, 3000001 + number * 3
    head = "{} xcp-ng-1 ".format(stamp)
    chatter = ["{}SM: [{}] lock: opening lock file /var/lock/sm/{}/sr".format(head, pid + 2, sr),
               "{}SM: [{}] ['/usr/bin/vhd-util', 'scan', '-f', '-m', '/var/run/sr-mount/{}/*.vhd']".format(
                   head, pid + 2, sr),
               "{}SM: [{}]   pread SUCCESS".format(head, pid + 2)] * 6
    leaf = "{:08x}".format(number % VDIS)
    gc = ["=== SR {}: gc ===".format(sr),
          "Leaf-coalesce candidate: {}(10.000G/1.200G/1.2G)".format(leaf),
          "Leaf-coalescing {}(10.000G/1.200G/1.2G) -> *cf4a78da(10.000G/5.000G/5.0G)".format(leaf)]
    if number % 3 == 0:
        gc += ["Aborted coalesce", "Iteration: 1 -- Initial size 1288490188 --> Final size 1300000000",
               "Max iterations (10) exceeded", "Starting size was         1288490188",
               "Final size was            1395864371", "Minimum size achieved was 1288490188",
               "*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*",
               "leaf-coalesce: EXCEPTION <class 'util.SMException'>, VDI {}-0000-4000-8000-000000000000 could not "
               "be coalesced".format(leaf),
               '  File "/opt/xensource/sm/cleanup.py", line 1, in coalesceLeaf', "",
               "*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*~*", "Leaf-coalesce failed on {}, skipping".format(leaf)]
    elif number % 3 == 1:
        gc += ["No space to leaf-coalesce {}(10.000G/1.200G/1.2G) (free space: 4194304)".format(leaf)]
    gc += ["No work, exiting", "GC process exiting, no work left"]
    lines = ["{}SMGC: [{}] {}".format(head, pid, text) for text in gc]
    lines.insert(3, "{}SMGC: [{}]   Running VHD coalesce on {}(10.000G/1.200G/1.2G)".format(head, child, leaf))
    return chatter + lines


# Words that begin a rule, repeated through a line: what would make a backtracking reader quadratic.
HOSTILE_WORDS = (" SMGC: [1] SR 4659 ('" + "x" * 40, " SMGC: [1] a: EXCEPTION <class '" + "y" * 40,
                 " SMGC: [1] Coalescing 1234abcd(" + "z" * 40,
                 " SM: [1] Coalesce failed on SR 00000000-0000-4000-8000-000000000000: ")
HOSTILE_BYTES = 10 * MIB


def write_hostile_log(path):
    written, number = 0, 0
    with open(path, "w") as stream:
        while written < HOSTILE_BYTES:
            words = HOSTILE_WORDS[number % len(HOSTILE_WORDS)]
            text = "Jan  2 16:01:40 xcp-ng-1 SMGC: [42] {}\n".format(words * (60000 // len(words)))
            stream.write(text)
            written += len(text)
            number += 1


def write_log(path, nbytes, start):
    srs = ["{:08x}-0000-4000-8000-{:012x}".format(index, index) for index in range(8)]
    number, written = start, 0
    with open(path, "a") as stream:
        while written < nbytes:
            text = "\n".join(block(number, srs[number % len(srs)])) + "\n"
            stream.write(text)
            written += len(text)
            number += 1
    return number


def measure(conf):
    output = subprocess.check_output([sys.executable, "-c", MEASURE, conf], cwd=REPOSITORY,
                                     env=dict(os.environ, PYTHONPATH=REPOSITORY))
    return json.loads(output.decode("utf-8"))


def grep_count(path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.check_output(["grep", "-c", "SMGC", path])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), time.monotonic() - started


def run():
    figures = []
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "SMlog")
        conf = os.path.join(directory, "agent.conf")
        with open(conf, "w") as stream:
            stream.write("[agent]\nstate_dir = {}\n[storage]\nsmlog_path = {}\n".format(
                os.path.join(directory, "state"), path))
        sys.stderr.write("smlog: writing a 100 MiB SMlog\n")
        number = write_log(path, FIRST_READ_BYTES, 0)
        first = measure(conf)
        grep_cpu, grep_wall = grep_count(path)
        figures += [("first read of {:.0f} MiB: CPU s".format(first["bytes"] / MIB), "{:.2f}".format(first["cpu"])),
                    ("first read: wall s", "{:.2f}".format(first["wall"])),
                    ("first read: peak RSS increase MB", "{:.1f}".format(first["rss_kib"] / 1024.0)),
                    ("first read: GC runs found", first["runs"]),
                    ("grep -c SMGC over the same file: CPU s", "{:.2f}".format(grep_cpu)),
                    ("grep -c SMGC over the same file: wall s", "{:.2f}".format(grep_wall))]
        write_log(path, INCREMENT_BYTES, number)
        increment = measure(conf)
        figures += [("incremental read of {:.1f} MiB: CPU ms".format(increment["bytes"] / MIB),
                     "{:.0f}".format(increment["cpu"] * 1000)),
                    ("incremental read: wall ms", "{:.0f}".format(increment["wall"] * 1000)),
                    ("incremental read: peak RSS increase MB", "{:.1f}".format(increment["rss_kib"] / 1024.0))]
        os.remove(path)
        os.remove(os.path.join(directory, "state", "smlog.json"))
        write_hostile_log(path)
        hostile = measure(conf)
        ordinary_per_mib = first["cpu"] / (first["bytes"] / MIB)
        hostile_per_mib = hostile["cpu"] / (hostile["bytes"] / MIB)
        figures += [("read of {:.0f} MiB of hostile 60 KB lines: CPU s".format(hostile["bytes"] / MIB),
                     "{:.2f}".format(hostile["cpu"])),
                    ("hostile lines: CPU per MiB / an ordinary log's", "{:.1f}".format(
                        hostile_per_mib / ordinary_per_mib if ordinary_per_mib else 0.0))]
    rss_mb = max(first["rss_kib"], increment["rss_kib"]) / 1024.0
    figures += [verdict("first read CPU < {} s".format(TARGET_FIRST_CPU), first["cpu"] < TARGET_FIRST_CPU),
                verdict("incremental read CPU < {:.0f} ms".format(TARGET_INCREMENT_CPU * 1000),
                        increment["cpu"] < TARGET_INCREMENT_CPU),
                verdict("peak RSS increase < {} MB".format(TARGET_RSS_MB), rss_mb < TARGET_RSS_MB)]
    return figures


def verdict(target, met):
    return ("target: " + target, "met" if met else "NOT MET")


def main():
    for figure, value in run():
        print("{:<60} {}".format(figure, value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
