#!/usr/bin/env python3
"""Prints the packets of one XML edit between a manager and one worker (BENCHMARKS.md "Session 10").

Reuses the one-worker cluster that bench-rsync leaves behind when given a work directory (see
scripts/war-edit-timing.py), restarts its daemons, and edits one Synapse XML N times (the same
file: from the second edit on, the manager holds the worker's version and sends a delta of it),
each time capturing UDP port 17700 on lo with tcpdump (installed if missing):

    BENCH_SYNCD_LOG=info target/release/bench-rsync --scale medium --reps 0 \\
        --changes xml-edit --no-lsyncd --fanout '' --work /tmp/wt
    scripts/xml-edit-packets.py /tmp/wt 3

Each edit prints its packets (direction and UDP payload bytes) and the total with IP/UDP
headers. Packets that fall in the capture window by chance (QUIC keep-alives) are counted too.
BIN=DIR takes syncd and syncctl from DIR (default target/release).
"""
import glob
import os
import sys
import time


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    work = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from warrig import Rig, capture, ensure_tcpdump, stop
    ensure_tcpdump()
    cluster = os.path.join(work, "inc-syncd")
    bindir = os.path.abspath(os.environ.get("BIN", "target/release"))
    procs = Rig(work).start(bindir)
    try:
        xml = sorted(glob.glob(cluster + "/mgr/server/synapse-configs/default/api/*.xml"))[1]
        rel = os.path.relpath(xml, cluster + "/mgr/server")
        for n in range(runs):
            time.sleep(2)
            data = open(xml, "rb").read()
            new = data.replace(b"</api>", b"<!-- edited %d: 0123456789 0123456789 0123456789"
                               b" 0123456789 0123456789 0123 -->\n</api>" % n, 1)
            tmp = os.path.join(cluster, "scratch", "xml.tmp")
            with open(tmp, "wb") as f:
                f.write(new)

            def deploy():
                t0 = time.monotonic()
                os.rename(tmp, xml)
                while open(os.path.join(cluster, "w0", "server", rel), "rb").read() != new:
                    time.sleep(0.001)
                return (time.monotonic() - t0) * 1000

            took, packets = capture(deploy)
            print(f"edit {n}: {took:.0f} ms, +{len(new) - len(data)} bytes")
            for src, dst, size in packets:
                print(f"  {src} > {dst}: {size}")
            total = sum(size + 28 for _, _, size in packets)
            print(f"  {len(packets)} packets, {total} bytes with IP/UDP headers")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
