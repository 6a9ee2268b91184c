"""What the hand rigs share (scripts/war-edit-timing.py, war-flip-ab.py, xml-edit-packets.py,
new-car-packets.py): the one-worker cluster bench-rsync leaves behind with `--work DIR`, its
63 MB WAR's two versions, starting and stopping the daemons on it, waiting until the worker
shows a deployed version, and counting the packets of one deploy on loopback.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

REL = "webapps/api-gateway.war"


class Rig:
    """The cluster in WORK/inc-syncd and the two versions of its WAR: the base tree's, and the
    last one bench-rsync deployed (kept aside in WORK/war-edited.war)."""

    def __init__(self, work):
        self.cluster = os.path.join(work, "inc-syncd")
        self.mgr_file = os.path.join(self.cluster, "mgr", "server", REL)
        self.worker_file = os.path.join(self.cluster, "w0", "server", REL)
        self.versions = [os.path.join(work, "base", REL), os.path.join(work, "war-edited.war")]
        if not os.path.exists(self.versions[1]):
            shutil.copyfile(self.mgr_file, self.versions[1])
        self.scratch = os.path.join(self.cluster, "scratch")
        os.makedirs(self.scratch, exist_ok=True)
        self.socket = os.path.join(self.cluster, "mgr", "admin.sock")

    def start(self, bindir):
        """Starts the manager and the agent of BIN_DIR (debug logs appended to mgr.log and
        w0.log) and returns once the worker is in sync."""
        procs = []
        for role, node in (("manager", "mgr"), ("agent", "w0")):
            procs.append(subprocess.Popen(
                [os.path.join(bindir, "syncd"), role, "--config", "syncd.toml"],
                cwd=os.path.join(self.cluster, node),
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(self.cluster, f"{node}.log"), "a"),
                env=dict(os.environ, SYNCD_LOG="debug")))
        for _ in range(100):
            if any(p.poll() is not None for p in procs):
                sys.exit(f"{bindir}: a daemon exited (port taken? see the logs in {self.cluster})")
            if subprocess.run([self.syncctl(bindir), "--socket", self.socket, "wait", "--all",
                               "--timeout", "60s"], capture_output=True).returncode == 0:
                return procs
            time.sleep(0.2)
        sys.exit("the cluster did not come up")

    @staticmethod
    def syncctl(bindir):
        return os.path.join(bindir, "syncctl")

    def stage_next(self):
        """Copies the version the manager does not hold now beside the folder; returns its path."""
        same = os.stat(self.mgr_file).st_size == os.stat(self.versions[1]).st_size
        tmp = os.path.join(self.scratch, "war.tmp")
        shutil.copyfile(self.versions[0] if same else self.versions[1], tmp)
        return tmp

    def wait_shown(self, want):
        """Polls (every ms) until the worker's WAR has `want`'s length and mtime."""
        while True:
            try:
                got = os.stat(self.worker_file)
                if got.st_size == want.st_size and got.st_mtime_ns == want.st_mtime_ns:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.001)


def stop(procs):
    """Stops the daemons `Rig.start` returned."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait()


def ensure_tcpdump():
    if shutil.which("tcpdump") is None:
        subprocess.run(["apt-get", "install", "-y", "tcpdump"], check=True,
                       stdout=subprocess.DEVNULL)


def capture(deploy, port=17700):
    """Runs `deploy()` while tcpdump watches UDP port `port` on loopback (from a second before
    to a second after); returns what `deploy` returned and the packets, each (source,
    destination, UDP payload bytes)."""
    cap = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-n", "-q", "-l", "-B", "262144", f"udp port {port}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(1)
    result = deploy()
    time.sleep(1)
    cap.send_signal(signal.SIGINT)
    out, _ = cap.communicate()
    packets = [(l.split()[2], l.split()[4].rstrip(":"), int(l.split()[-1]))
               for l in out.splitlines() if l.split() and l.split()[-1].isdigit()]
    return result, packets
