#!/usr/bin/env python3
"""What a commit's fdatasync costs when it writes into a hole, against into blocks the
file already has (the question behind src/store/prefill.rs).

    python3 benches/fsync_probe.py [DIR]     # DIR defaults to $TMPDIR or /tmp

Each "commit" writes PAGES pages of 4 KiB at the next offsets and calls fdatasync, N times:
once on a sparse file (set_len, as redb grows its file: every commit's pages are new
blocks), once on the same size written with zeros first (as the store now prefills).
Prints wall time and this process's system and user CPU per commit; two rounds each.
"""
import os
import sys
import time

N = 1500
PG = 4096
PAGES = 12
SIZE = N * PAGES * PG + PG
DIR = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TMPDIR", "/tmp")


def sparse(fd):
    os.ftruncate(fd, SIZE)
    os.fsync(fd)


def zeros(fd):
    z = bytes(1 << 20)
    for o in range(0, SIZE, 1 << 20):
        os.pwrite(fd, z, o)
    os.fsync(fd)


def run(name, prepare):
    path = os.path.join(DIR, "fsync_probe.dat")
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        prepare(fd)
        page = os.urandom(PG)
        t0, c0 = time.perf_counter(), os.times()
        for i in range(N):
            for p in range(PAGES):
                os.pwrite(fd, page, (i * PAGES + p) * PG)
            os.fdatasync(fd)
        t1, c1 = time.perf_counter(), os.times()
    finally:
        os.close(fd)
        os.remove(path)
    print(f"{name}: {(t1 - t0) / N * 1e6:.0f} us/commit wall, "
          f"{(c1.system - c0.system) / N * 1e6:.0f} us system, "
          f"{(c1.user - c0.user) / N * 1e6:.0f} us user")


for _ in range(2):
    run("into a hole (sparse file)      ", sparse)
    run("into written blocks (zeros first)", zeros)
