#!/usr/bin/env python3
"""Where a fan-out's time goes: one manager and N agents on this machine, each on an empty
folder; REPS new random CARs (stored ZIPs, SIZE bytes, 5 MB by default) are renamed into the
manager's folder one after another. Prints, per deploy, the time until every worker has the
file (its length and mtime, polled every 2 ms), and the CPU time and page faults of the
manager and of each agent (averaged) over all the deploys.

    cargo build --release -p syncd
    scripts/fanout-cpu.py target/release 10 11        # ten workers, eleven deploys
    SIZE=2000 scripts/fanout-cpu.py target/release 10 11   # a generation's fixed cost

bench-rsync's fan-out rows time the same thing against rsync; this is for looking inside.
BIN_DIR holds syncd and syncctl. LOG sets SYNCD_LOG (logs in the work dir, kept with KEEP=1).
TREE=DIR starts every folder with a copy of DIR (as bench-rsync's fan-out does: workers that
hold a whole deployment, so per-generation costs that grow with the folder show):

    target/release/gen-tree --scale medium /tmp/ft-base
    TREE=/tmp/ft-base scripts/fanout-cpu.py target/release 10 11
"""
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

if len(sys.argv) != 4:
    sys.exit(__doc__)
bindir, n, reps = os.path.abspath(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
size = int(os.environ.get("SIZE", "5000000"))
port = int(os.environ.get("PORT", "17790"))
syncd, ctl = os.path.join(bindir, "syncd"), os.path.join(bindir, "syncctl")
work = tempfile.mkdtemp(prefix="fanout-cpu.")


def init(d):
    os.makedirs(d, exist_ok=True)
    out = subprocess.check_output([syncd, "init", "--state-dir", f"{d}/state"],
                                  stderr=subprocess.DEVNULL)
    return out.decode().strip()


def usage(pid):
    """(minor faults, CPU ticks) of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]) + int(fields[12])


manager_id = init(f"{work}/mgr")
agent_ids = [init(f"{work}/w{i}") for i in range(n)]
if os.environ.get("TREE"):
    shutil.copytree(os.environ["TREE"], f"{work}/mgr/server", symlinks=True)
else:
    os.makedirs(f"{work}/mgr/server")
config = ('[node]\nname = "mgr"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n'
          f'[manager]\nlisten = "127.0.0.1:{port}"\n')
for i, a in enumerate(agent_ids):
    config += f'[[manager.agents]]\nname = "w{i}"\nid = "{a}"\n'
config += '[[folders]]\nname = "deployment"\npath = "server"\n'
open(f"{work}/mgr/syncd.toml", "w").write(config)
for i in range(n):
    os.makedirs(f"{work}/w{i}/server")
    open(f"{work}/w{i}/syncd.toml", "w").write(
        f'[node]\nname = "w{i}"\nstate_dir = "state"\nadmin_socket = "admin.sock"\n'
        f'[agent]\nmanager = "127.0.0.1:{port}"\nmanager_id = "{manager_id}"\n'
        '[[folders]]\nname = "deployment"\npath = "server"\n')
env = dict(os.environ, SYNCD_LOG=os.environ.get("LOG", "info"))
procs = []
try:
    for role, d in [("manager", "mgr")] + [("agent", f"w{i}") for i in range(n)]:
        procs.append(subprocess.Popen(
            [syncd, role, "--config", f"{work}/{d}/syncd.toml"], cwd=f"{work}/{d}",
            stdout=subprocess.DEVNULL, stderr=open(f"{work}/{d}.log", "w"), env=env))
    time.sleep(1)
    subprocess.check_call([ctl, "--socket", f"{work}/mgr/admin.sock", "wait", "--all",
                           "--timeout", "300s"], stdout=subprocess.DEVNULL)
    # The joins' after-effects (a full drift walk on each worker, memory trims) settle first.
    time.sleep(3)
    before = [usage(p.pid) for p in procs]
    rng = random.Random(7)
    times = []
    for rep in range(reps):
        time.sleep(0.3)
        os.sync()
        tmp = f"{work}/car.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            left, k = size, 0
            while left > 0:
                part = min(left, rng.randint(50_000, 800_000)) if left > 100_000 else left
                z.writestr(f"lib/e{k}.jar", rng.randbytes(part))
                left, k = left - part, k + 1
        rel = f"fan-{rep}.car"
        os.rename(tmp, f"{work}/mgr/server/{rel}")
        t0 = time.monotonic()
        want = os.stat(f"{work}/mgr/server/{rel}")
        pending = set(range(n))
        while pending:
            for i in list(pending):
                try:
                    got = os.stat(f"{work}/w{i}/server/{rel}")
                except FileNotFoundError:
                    continue
                if (got.st_size, got.st_mtime_ns) == (want.st_size, want.st_mtime_ns):
                    pending.discard(i)
            if pending:
                if time.monotonic() - t0 > 60:
                    sys.exit(f"workers {sorted(pending)} did not get {rel} in 60 s; see {work}")
                time.sleep(0.002)
        times.append((time.monotonic() - t0) * 1000)
    after = [usage(p.pid) for p in procs]
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    d = [(a[0] - b[0], (a[1] - b[1]) * tick_ms) for a, b in zip(after, before)]
    agents = d[1:]
    print(f"{n} workers, {reps} deploys of {size} bytes: "
          + " ".join(f"{t:.0f}" for t in times) + f" ms, median {statistics.median(times):.1f} ms")
    print(f"per deploy: manager {d[0][1] / reps:.1f} ms CPU, {d[0][0] / reps:.0f} faults; "
          f"each agent {sum(a[1] for a in agents) / reps / n:.1f} ms CPU, "
          f"{sum(a[0] for a in agents) / reps / n:.0f} faults")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    if os.environ.get("KEEP"):
        print(f"kept {work}")
    else:
        shutil.rmtree(work)
