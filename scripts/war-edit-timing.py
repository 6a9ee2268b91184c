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
import shutil
import signal
import subprocess
import sys
import time

REL = "webapps/api-gateway.war"


def start(work, binary):
    cluster = os.path.join(work, "inc-syncd")
    procs = []
    for role, node in (("manager", "mgr"), ("agent", "w0")):
        log = open(os.path.join(cluster, f"{node}.log"), "a")
        procs.append(
            subprocess.Popen(
                [binary, role, "--config", "syncd.toml"],
                cwd=os.path.join(cluster, node),
                env=dict(os.environ, SYNCD_LOG="debug"),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
    syncctl = os.path.join(os.path.dirname(binary), "syncctl")
    sock = os.path.join(cluster, "mgr", "admin.sock")
    for _ in range(100):
        if subprocess.run([syncctl, "--socket", sock, "wait", "--all", "--timeout", "60s"],
                          capture_output=True).returncode == 0:
            return procs
        time.sleep(0.2)
    sys.exit("the cluster did not come up")


def main():
    if len(sys.argv) < 3 or sys.argv[2] not in ("cold", "cached"):
        sys.exit(__doc__)
    work, mode = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    binary = os.environ.get("SYNCD", "target/release/syncd")
    cluster = os.path.join(work, "inc-syncd")
    mgr_file = os.path.join(cluster, "mgr", "server", REL)
    worker_file = os.path.join(cluster, "w0", "server", REL)
    # The two versions: the base tree's, and the edited one bench-rsync deployed.
    versions = [os.path.join(work, "base", REL), os.path.join(work, "war-edited.war")]
    if not os.path.exists(versions[1]):
        shutil.copyfile(mgr_file, versions[1])
    scratch = os.path.join(cluster, "scratch")
    os.makedirs(scratch, exist_ok=True)
    procs = start(work, os.path.abspath(binary))
    times = []
    try:
        for _ in range(runs):
            size = os.stat(mgr_file).st_size
            src = versions[0] if size == os.stat(versions[1]).st_size else versions[1]
            tmp = os.path.join(scratch, "war.tmp")
            shutil.copyfile(src, tmp)
            os.sync()
            fd = os.open(worker_file, os.O_RDONLY)
            if mode == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 20):
                    pass
            os.close(fd)
            time.sleep(6)
            want = os.stat(tmp)
            t0 = time.monotonic()
            os.rename(tmp, mgr_file)
            while True:
                try:
                    got = os.stat(worker_file)
                    if got.st_size == want.st_size and got.st_mtime_ns == want.st_mtime_ns:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.001)
            times.append((time.monotonic() - t0) * 1000)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
    print(mode, " ".join(f"{t:.0f}" for t in times), "ms")


if __name__ == "__main__":
    main()
