"""How fast a cold adapter file can be read from this machine's local disk, by read pattern.

    python3 scripts/gpu/disk_read.py DIR [MB] [FILES]

Writes FILES (default 24) files of MB (default 27, a rank-16 q/k/v/o adapter of the Mistral-7B shape in
fp16) random bytes under DIR, syncs them, and then, for each read pattern, drops a file from the page cache
(POSIX_FADV_DONTNEED) and reads it whole into fresh memory, timing the read: positioned reads of PIECE bytes
on THREADS threads, through the page cache or with O_DIRECT. Each pattern reads each file once, in turn, and
the median over the files is printed as GB/s and ms. The first lines describe the disk under DIR.

This is the baseline of bench.py's cold adapter load (its 27 MB file read took 28 ms, ~1 GB/s, in session
24 call 1, with 4 MiB pieces in parallel): what the disk gives, so that the shard's read can be judged
against it.
"""
import mmap
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()


def read_file(path, piece, threads, direct, pool):
    """Reads `path` whole into a fresh anonymous mapping; seconds."""
    size = os.path.getsize(path)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    alloc = (size + 4095) // 4096 * 4096
    t = time.perf_counter()
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, alloc)
    view = memoryview(buf)

    def one(off):
        n = min(piece, alloc - off)
        got = os.preadv(fd, [view[off:off + n]], off)
        if got < min(n, size - off):
            raise IOError(f"short read {got} at {off}")

    offs = range(0, alloc, piece)
    if threads == 1:
        for o in offs:
            one(o)
    else:
        list(pool.map(one, offs))
    dt = time.perf_counter() - t
    os.close(fd)
    view.release()
    buf.close()
    return dt


def main():
    root = sys.argv[1]
    mb = int(sys.argv[2]) if len(sys.argv) > 2 else 27
    files = int(sys.argv[3]) if len(sys.argv) > 3 else 24
    os.makedirs(root, exist_ok=True)
    print("DISK df:", sh(f"df -hT {root} | tail -1"))
    print("DISK mount:", sh(f"findmnt -T {root} -o SOURCE,FSTYPE,OPTIONS | tail -1"))
    print("DISK lsblk:\n" + sh("lsblk -d -o NAME,ROTA,SIZE,MODEL,TRAN,TYPE 2>/dev/null"))
    for q in ("read_ahead_kb", "max_sectors_kb", "nr_requests", "scheduler"):
        print(f"DISK {q}:", sh(f"for d in /sys/block/*; do echo -n \"$(basename $d)=$(cat $d/queue/{q} 2>/dev/null) \"; done"))
    paths = []
    t = time.time()
    for i in range(files):
        p = f"{root}/f{i}"
        with open(p, "wb") as f:
            f.write(os.urandom(mb << 20))
        paths.append(p)
    os.sync()
    print(f"DISK wrote {files} x {mb} MiB and synced in {time.time() - t:.1f}s")
    patterns = [(1 << 30, 1, False), (4 << 20, 8, False), (1 << 20, 8, False), (1 << 20, 16, False),
                (1 << 20, 32, False), (256 << 10, 32, False), (256 << 10, 64, False), (4 << 20, 8, True),
                (1 << 20, 16, True), (1 << 20, 32, True), (512 << 10, 64, True), (256 << 10, 64, True)]
    with ThreadPoolExecutor(64) as pool:
        for rnd in (1, 2):
            for piece, threads, direct in patterns:
                ts = [read_file(p, piece, threads, direct, pool) for p in paths]
                med = statistics.median(ts)
                name = f"piece={'whole' if piece >= 1 << 30 else str(piece >> 10) + 'K'} threads={threads} " \
                       f"{'O_DIRECT' if direct else 'buffered'}"
                print(f"DISK round {rnd} {name}: median {med * 1e3:.1f} ms = {(mb << 20) / med / 1e9:.2f} GB/s "
                      f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms)", flush=True)
    for p in paths:
        os.remove(p)


if __name__ == "__main__":
    main()
