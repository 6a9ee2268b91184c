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
import signal
import subprocess
import sys
import time

from warrig import Rig


def cpu_ms(proc):
    fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 10


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    work, rounds = sys.argv[1], int(sys.argv[2])
    bindirs = [os.path.abspath(b) for b in sys.argv[3:]]
    rig = Rig(work)
    results = {b: [] for b in bindirs}
    for _ in range(rounds):
        for bindir in bindirs:
            procs = rig.start(bindir)
            try:
                for _ in range(2):
                    tmp = rig.stage_next()
                    os.sync()
                    # The worker's copy in the page cache, as bench-rsync leaves it.
                    with open(rig.worker_file, "rb") as f:
                        while f.read(1 << 20):
                            pass
                    time.sleep(4)
                    cpu0 = cpu_ms(procs[1])
                    want = os.stat(tmp)
                    t0 = time.monotonic()
                    os.rename(tmp, rig.mgr_file)
                    waiter = subprocess.Popen(
                        [rig.syncctl(bindir), "--socket", rig.socket, "wait", "--timeout", "60s"],
                        stdout=subprocess.DEVNULL)
                    rig.wait_shown(want)
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
