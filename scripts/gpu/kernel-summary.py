"""Sums an `ncu --csv --metrics gpu__time_duration.sum` listing per kernel name: calls, total ms, share.

The listing may hold the profiled program's own stdout lines too (flux-bench's JSON); only CSV rows with a
kernel name and a duration count.
"""
import csv
import sys
from collections import defaultdict


def main(path):
    header, rows = None, []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if header is None:
                if "Kernel Name" in row and "Metric Value" in row:
                    header = row
                continue
            if len(row) == len(header):
                rows.append(dict(zip(header, row)))
    if not rows:
        sys.exit(f"{path}: no kernel rows")
    total = defaultdict(float)
    calls = defaultdict(int)
    for r in rows:
        ns = float(r["Metric Value"].replace(",", ""))
        total[r["Kernel Name"]] += ns
        calls[r["Kernel Name"]] += 1
    all_ns = sum(total.values())
    print(f"{len(rows)} kernels, {all_ns / 1e6:.1f} ms of kernel time")
    for name, ns in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{ns / 1e6:9.2f} ms {100 * ns / all_ns:5.1f}% {calls[name]:6d}x  {name[:110]}")


if __name__ == "__main__":
    main(sys.argv[1])
