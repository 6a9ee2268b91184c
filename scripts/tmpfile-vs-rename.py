#!/usr/bin/env python3
"""How an apply could put new files in place: staged under one directory and renamed into their
target directories (what syncd does), or created with O_TMPFILE in the target directory and
linked in with linkat (no temporary name; issue 7's idea 7). Writes N files of 4 KiB into 40
directories under DIR, makes them durable with one sync, places them, and syncs the directories;
prints each phase. Run both modes in turn, several times: the first pass after deletions pays
ext4's inode allocation (see scripts/create-probe.py).

    python3 scripts/tmpfile-vs-rename.py /tmp/ab 2000 rename
    python3 scripts/tmpfile-vs-rename.py /tmp/ab 2000 tmpfile
"""
import ctypes
import os
import sys
import time

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
libc = ctypes.CDLL(None, use_errno=True)


def linkat(src, dst):
    if libc.linkat(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), AT_SYMLINK_FOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), dst)


def main():
    base, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = os.urandom(4096)
    dirs = [f"d{i}" for i in range(40)]
    root = os.path.join(base, f"t-{mode}-{time.time_ns()}")
    os.makedirs(root)
    for d in dirs:
        os.mkdir(os.path.join(root, d))
    target = lambda i: os.path.join(root, dirs[i % 40], f"f{i}.xml")
    t0 = time.perf_counter()
    if mode == "rename":
        staging = os.path.join(root, ".staging")
        os.mkdir(staging)
        staged = []
        for i in range(n):
            p = os.path.join(staging, f"s{i}")
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)
            staged.append(p)
        os.sync()
        t1 = time.perf_counter()
        for i, p in enumerate(staged):
            os.rename(p, target(i))
        t2 = time.perf_counter()
        os.rmdir(staging)
    elif mode == "tmpfile":
        fds = []
        for i in range(n):
            fd = os.open(os.path.join(root, dirs[i % 40]), os.O_TMPFILE | os.O_WRONLY, 0o644)
            os.write(fd, data)
            fds.append(fd)
        os.sync()
        t1 = time.perf_counter()
        for i, fd in enumerate(fds):
            linkat(f"/proc/self/fd/{fd}", target(i))
            os.close(fd)
        t2 = time.perf_counter()
    else:
        sys.exit(f"unknown mode {mode}: rename or tmpfile")
    for d in dirs:
        fd = os.open(os.path.join(root, d), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    t3 = time.perf_counter()
    ms = lambda a, b: 1000 * (b - a)
    print(f"{mode:8} N={n} stage+sync {ms(t0, t1):7.1f} ms  place {ms(t1, t2):6.1f} ms  "
          f"dir syncs {ms(t2, t3):5.1f} ms  total {ms(t0, t3):7.1f} ms")


if __name__ == "__main__":
    main()
