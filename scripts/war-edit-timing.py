#!/usr/bin/env python3
"""Times a 63 MB WAR edit on one worker, with the worker's old copy cached or not.

Hand measurement behind BENCHMARKS.md "Session 8" (the local copy's cold and cached figures).
It reuses the one-worker cluster that bench-rsync leaves behind when given a work directory and
BENCH_SYNCD_LOG, restarts its daemons with debug logs, and deploys the two versions of the
bench's WAR (the base tree's and the one-entry edit) in turn:

    BENCH_SYNCD_LOG=debug target/release/bench-rsync --scale medium --reps 0 \\
        --changes war-entry --no-lsyncd --fanout '' --work /tmp/wt
    scripts/war-edit-timing.py /tmp/wt cold 3
    scripts/war-edit-timing.py /tmp/wt cached 3
    grep copied_ms /tmp/wt/inc-syncd/w0.log | tail -6

`cold` drops the worker's copy from the page cache first (fadvise DONTNEED, then 6 s for the
VM to hand the memory back); `cached` reads it in first. Prints the time from the rename until
the worker's file has the new length and mtime; the agent's log gives the copy's share.
"""
import os
import signal
import sys
import time

from warrig import Rig


def main():
    if len(sys.argv) < 3 or sys.argv[2] not in ("cold", "cached"):
        sys.exit(__doc__)
    work, mode = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    binary = os.environ.get("SYNCD", "target/release/syncd")
    rig = Rig(work)
    procs = rig.start(os.path.dirname(os.path.abspath(binary)))
    times = []
    try:
        for _ in range(runs):
            tmp = rig.stage_next()
            os.sync()
            fd = os.open(rig.worker_file, os.O_RDONLY)
            if mode == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 20):
                    pass
            os.close(fd)
            time.sleep(6)
            want = os.stat(tmp)
            t0 = time.monotonic()
            os.rename(tmp, rig.mgr_file)
            rig.wait_shown(want)
            times.append((time.monotonic() - t0) * 1000)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
    print(mode, " ".join(f"{t:.0f}" for t in times), "ms")


if __name__ == "__main__":
    main()
