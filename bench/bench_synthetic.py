"""Synthetic generation rate (images/s) at 4K and 8K: JPEG vs PNG encoding, one process vs two, in one run.

    .venv/bin/python bench/bench_synthetic.py [--count 32] [--out /tmp/mgpo-bench-synth]

Each configuration writes ``count`` images of the same seed into its own folder (same drawing work, only the
encoder or the process count differs) and reports images/s and MB written; ratios are against JPEG, 1 process.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgpo_core.data.synthetic import iter_synthetic_samples  # noqa: E402


def run(
    out: Path, count: int, width: int, height: int, image_format: str, workers: int
) -> tuple[float, float]:
    """(images per second, megabytes per image) for one configuration."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    samples = list(
        iter_synthetic_samples(
            out, count, seed=0, width=width, height=height, image_format=image_format, workers=workers
        )
    )
    took = time.perf_counter() - t0
    size = sum(os.path.getsize(s.image_path) for s in samples) / count / 1e6
    shutil.rmtree(out, ignore_errors=True)
    return count / took, size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=32, help="images per configuration (8K: a quarter)")
    p.add_argument("--out", default="/tmp/mgpo-bench-synth")
    args = p.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average at start {os.getloadavg()[0]:.1f} (other work on the machine slows every mode)"
    )
    configs = [
        ("4K 3840x2160", 3840, 2160, "jpeg", 1),
        ("4K 3840x2160", 3840, 2160, "png", 1),
        ("4K 3840x2160", 3840, 2160, "jpeg", 2),
        ("8K 7680x4320", 7680, 4320, "jpeg", 1),
        ("8K 7680x4320", 7680, 4320, "png", 1),
    ]
    results = []
    for name, w, h, fmt, workers in configs:
        count = args.count if w < 7000 else max(2, args.count // 4)
        rate, mb = run(Path(args.out) / f"{w}-{fmt}-{workers}", count, w, h, fmt, workers)
        results.append((name, fmt, workers, count, rate, mb))
    print(
        f"\n{'size':14s} {'format':6s} {'procs':>5s} {'images':>6s} {'images/s':>9s} {'MB/image':>9s} {'vs jpeg/1':>9s}"
    )
    base = {r[0]: r[4] for r in results if r[1] == "jpeg" and r[2] == 1}
    for name, fmt, workers, count, rate, mb in results:
        print(f"{name:14s} {fmt:6s} {workers:5d} {count:6d} {rate:9.2f} {mb:9.2f} {rate / base[name]:8.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
