"""Summarises nsys `cuda_gpu_trace` CSVs (scripts/gpu/timeline.sh): per kernel name, launches, device time
and the idle time just before it, per step.

    python3 scripts/gpu/timeline_summary.py OUT_DIR STEPS SCENARIO ...

Each SCENARIO's CSV is the first OUT_DIR/SCENARIO_*trace*.csv (nsys names it cuda_gpu_trace, or gputrace
before 2023). Ops are ordered by start; the idle time
before an op is its start less the latest end among the ops before it (0 when they overlap). The trace is cut
into forward passes at each `embedding` launch (else where the device idles over GAP_MAX_US), and the last
STEPS are summed; idle gaps over GAP_MAX_US (the host) are left out.
"""
import csv
import glob
import sys

GAP_MAX_US = 200.0


def column(header, *words):
    for i, h in enumerate(header):
        if all(w.lower() in h.lower() for w in words):
            return i
    raise KeyError(f"no column with {words} in {header}")


def short(name):
    name = name.split("(")[0].strip()
    return name[:56]


def load(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # nsys may print notes before the header: the header is the first row naming a start and a duration.
    h = next(i for i, r in enumerate(rows) if any("Start" in c for c in r) and any("Duration" in c for c in r))
    header, body = rows[h], rows[h + 1:]
    cs, cd, cn = column(header, "Start"), column(header, "Duration"), column(header, "Name")
    ops = []
    for r in body:
        if len(r) <= max(cs, cd, cn) or not r[cs].strip():
            continue
        ops.append((float(r[cs]) / 1e3, float(r[cd]) / 1e3, short(r[cn])))
    ops.sort()
    return ops


def stretches(ops):
    """The ops cut into forward passes, each from an `embedding` launch (a pass's first kernel) up to the next
    one (ops before the first are dropped); without one, cut where the device idles over GAP_MAX_US. Each op
    carries the idle time before it, 0 for a pass's first op and for gaps over GAP_MAX_US (the host)."""
    marked = any(name == "embedding" for _, _, name in ops)
    out, cur, end = [], [], None
    for start, dur, name in ops:
        gap = 0.0 if end is None else max(0.0, start - end)
        cut = name == "embedding" if marked else gap > GAP_MAX_US
        if gap > GAP_MAX_US:
            gap = 0.0
        if cut:
            if cur:
                out.append(cur)
            cur, gap = [], 0.0
        if cur or not marked or name == "embedding":
            cur.append((start, dur, name, gap))
        end = start + dur if end is None else max(end, start + dur)
    if cur:
        out.append(cur)
    return out


def summarise(ops, steps):
    parts = stretches(ops)[-steps:]
    per = {}
    busy = idle = 0.0
    for part in parts:
        for _, dur, name, gap in part:
            n, d, g = per.get(name, (0, 0.0, 0.0))
            per[name] = (n + 1, d + dur, g + gap)
            busy += dur
            idle += gap
    spans = [(p[-1][0] + p[-1][1] - p[0][0]) for p in parts]
    return per, busy, idle, spans, sum(len(p) for p in parts)


def main():
    out, steps, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for s in scenarios:
        found = sorted(glob.glob(f"{out}/{s}_*trace*.csv"))
        if not found:
            print(f"## {s}: no trace CSV\n")
            continue
        per, busy, idle, spans, n = summarise(load(found[0]), steps)
        k = max(len(spans), 1)
        print(f"## {s}: the last {len(spans)} steps span {', '.join(f'{x / 1e3:.3f}' for x in spans)} ms; per step "
              f"{n / k:.0f} ops, device time {busy / k:.1f} us, idle between ops {idle / k:.1f} us")
        print(f"{'op':56} {'n/step':>7} {'us/step':>9} {'us each':>8} {'idle before, us/step':>21}")
        for name, (c, d, g) in sorted(per.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
            print(f"{name:56} {c / k:7.1f} {d / k:9.1f} {d / c:8.2f} {g / k:21.1f}")
        # One layer of the last pass in order: the ops from its 21st `add_rms_norm` (layer 10's first) to
        # its 23rd (start relative to the first, duration, idle before; a negative idle is an overlap).
        last = stretches(load(found[0]))[-1]
        norms = [i for i, op in enumerate(last) if op[2] == "add_rms_norm"]
        if len(norms) > 22:
            i0, i1 = norms[20], norms[22]
            print(f"one layer of the last pass, in order ({i1 - i0} ops):")
            t0, prev_end = last[i0][0], None
            for start, dur, name, _ in last[i0:i1]:
                idle = 0.0 if prev_end is None else start - prev_end
                print(f"  +{start - t0:8.1f} us {dur:7.2f} us (idle before {idle:6.2f})  {name}")
                prev_end = start + dur if prev_end is None else max(prev_end, start + dur)
        print()


if __name__ == "__main__":
    main()
