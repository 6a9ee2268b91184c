#!/usr/bin/env python3
"""How fast this machine's filesystem creates files right now: run it before timing an initial sync.

On ext4 without a journal (this machine's root), creating a file costs 4-20x more for up to six
minutes after a large deletion (the allocator skips recently freed inodes, `recently_deleted()`
in fs/ext4/ialloc.c); `cargo build`, `cargo test` and every bench's cleanup delete enough files to
cause it. About 20 us a file is the calm state (BENCHMARKS.md, sessions 5, 9 and 11).

    scripts/create-probe.py [DIR]      # creates 2,000 empty files in a new directory under DIR

The probe deletes nothing (that would disturb what it measures): its directory is renamed to
*.probe-trash beside it; remove those later, and then wait again.
"""
import os
import sys
import tempfile
import time

FILES = 2000


def main():
    parent = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    d = tempfile.mkdtemp(dir=parent, prefix="create-probe.")
    t = time.perf_counter()
    for i in range(FILES):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    per_file = (time.perf_counter() - t) / FILES
    os.rename(d, d + ".probe-trash")
    print(f"{per_file * 1e6:.0f} us/file ({'calm' if per_file < 40e-6 else 'slow: wait and probe again'})")


if __name__ == "__main__":
    main()
