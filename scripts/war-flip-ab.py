#!/usr/bin/env python3
"""Builds in turn on one WAR change: the hand A/B behind BENCHMARKS.md "Session 13".

Reuses the one-worker cluster bench-rsync leaves behind with a work directory, and flips its
63 MB WAR between the base tree's version and the last one bench-rsync deployed (a rebuild:
new timestamps in every entry header, one entry changed). For each build, in turn, ROUNDS
times: start the cluster with that build, flip twice, stop. Each flip prints the time from the
rename until the worker's file has the new length and mtime, until `syncctl wait` returns, and
the agent's CPU time over the flip (10 ms ticks). The agent's log (w0.log, debug) gives the
local copy's `copied_ms`, the manager's (mgr.log) the `hash_ms`.

    BENCH_SYNCD_LOG=debug target/release/bench-rsync --reps 0 --changes war-rebuilt \\
        --no-lsyncd --fanout '' --work /tmp/wr
    mkdir -p /tmp/bin-a /tmp/bin-b     # each holding a build's syncd and syncctl
    scripts/war-flip-ab.py /tmp/wr 3 /tmp/bin-a /tmp/bin-b

Check `pgrep -af "syncd (agent|manager)"` first: a daemon left on the cluster's port makes
every build measure that daemon instead.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

REL = "webapps/api-gateway.war"


def cpu_ms(proc):
    fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 10


def start(cluster, bindir):
    procs = []
    for role, node in (("manager", "mgr"), ("agent", "w0")):
        procs.append(subprocess.Popen(
            [os.path.join(bindir, "syncd"), role, "--config", "syncd.toml"],
            cwd=os.path.join(cluster, node),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(cluster, f"{node}.log"), "a"),
            env=dict(os.environ, SYNCD_LOG="debug")))
    time.sleep(0.5)
    for p in procs:
        if p.poll() is not None:
            sys.exit(f"{bindir}: a daemon exited at once (port taken? see the logs in {cluster})")
    subprocess.run([os.path.join(bindir, "syncctl"), "--socket",
                    os.path.join(cluster, "mgr", "admin.sock"), "wait", "--all", "--timeout",
                    "60s"], check=True, capture_output=True)
    return procs


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    work, rounds, bindirs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    cluster = os.path.join(work, "inc-syncd")
    mgr_file = os.path.join(cluster, "mgr", "server", REL)
    worker_file = os.path.join(cluster, "w0", "server", REL)
    versions = [os.path.join(work, "base", REL), os.path.join(work, "war-edited.war")]
    if not os.path.exists(versions[1]):
        shutil.copyfile(mgr_file, versions[1])
    scratch = os.path.join(cluster, "scratch")
    os.makedirs(scratch, exist_ok=True)
    results = {b: [] for b in bindirs}
    for _ in range(rounds):
        for bindir in bindirs:
            procs = start(cluster, os.path.abspath(bindir))
            try:
                for _ in range(2):
                    same = os.stat(mgr_file).st_size == os.stat(versions[1]).st_size
                    tmp = os.path.join(scratch, "war.tmp")
                    shutil.copyfile(versions[0] if same else versions[1], tmp)
                    os.sync()
                    # The worker's copy in the page cache, as bench-rsync leaves it.
                    with open(worker_file, "rb") as f:
                        while f.read(1 << 20):
                            pass
                    time.sleep(4)
                    cpu0 = cpu_ms(procs[1])
                    want = os.stat(tmp)
                    t0 = time.monotonic()
                    os.rename(tmp, mgr_file)
                    waiter = subprocess.Popen(
                        [os.path.join(bindir, "syncctl"), "--socket",
                         os.path.join(cluster, "mgr", "admin.sock"), "wait", "--timeout", "60s"],
                        stdout=subprocess.DEVNULL)
                    while True:
                        try:
                            got = os.stat(worker_file)
                            if got.st_size == want.st_size and got.st_mtime_ns == want.st_mtime_ns:
                                break
                        except FileNotFoundError:
                            pass
                        time.sleep(0.001)
                    shown = (time.monotonic() - t0) * 1000
                    waiter.wait()
                    waited = (time.monotonic() - t0) * 1000
                    time.sleep(0.2)
                    results[bindir].append((round(shown), round(waited), cpu_ms(procs[1]) - cpu0))
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                    p.wait()
    for bindir, rows in results.items():
        print(bindir, "shown / waited / agent CPU, ms:", rows)


if __name__ == "__main__":
    main()
