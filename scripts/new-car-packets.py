#!/usr/bin/env python3
"""Prints the packets of a brand-new random CAR between a manager and one worker on loopback
(BENCHMARKS.md "Session 18"): where syncd's bytes over the file's size go.

Reuses the one-worker cluster that bench-rsync leaves behind with a work directory (see
scripts/xml-edit-packets.py), restarts its daemons, and deploys N new 5 MB CARs of random stored
entries (renamed into the manager's folder), each time capturing UDP port 17700 on lo with
tcpdump (a 256 MiB capture buffer, so no packet is dropped):

    target/release/bench-rsync --scale medium --reps 0 --changes new-car --no-lsyncd \\
        --fanout '' --work /tmp/wt
    scripts/new-car-packets.py /tmp/wt 3

Per direction: packets as tcpdump sees them (a 65,000-byte one is a segmentation-offload batch
of ten 6,500-byte QUIC packets: loopback carries it whole, and nftables counts it once), UDP
payload, and the total over the file's size. BIN=DIR takes syncd and syncctl from DIR.
"""
import collections
import os
import random
import sys
import time
import zipfile


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
        for _ in range(runs):
            time.sleep(2)
            tmp = os.path.join(cluster, "scratch", "new.car")
            rnd = random.Random(time.time_ns())
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for i in range(20):
                    z.writestr(f"lib/entry{i}.bin", rnd.randbytes(250_000))
            size = os.path.getsize(tmp)

            def deploy():
                name = "new%d.car" % time.time_ns()
                t0 = time.monotonic()
                os.rename(tmp, os.path.join(cluster, "mgr/server/carbonapps", name))
                worker = os.path.join(cluster, "w0/server/carbonapps", name)
                while not os.path.exists(worker) or os.path.getsize(worker) != size:
                    time.sleep(0.001)
                return (time.monotonic() - t0) * 1000

            took, packets = capture(deploy)
            print(f"new CAR of {size} bytes: {took:.0f} ms")
            ways = collections.defaultdict(list)
            for src, dst, n in packets:
                ways[(src, dst)].append(n)
            for (src, dst), sizes in ways.items():
                print(f"  {src} > {dst}: {len(sizes)} packets, {sum(sizes)} bytes of UDP payload;"
                      f" commonest sizes {collections.Counter(sizes).most_common(4)}")
            total = sum(n + 28 for _, _, n in packets)
            print(f"  {total} bytes with IP/UDP headers, {total - size} over the file")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
