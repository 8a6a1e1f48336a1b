"""Filter-stage throughput (rows/s) on synthetic high-resolution images: header-only integrity vs full decode,
measured side by side in one run on the same files, with the ratio.

    .venv/bin/python bench/bench_filter.py [--images 2000] [--width 3840] [--height 2160] [--workers 2] [--rounds 2]

The images are generated once into ``--data`` (reused when the folder already holds enough) and read once
before timing, so every mode runs against a warm page cache and measures checking, not the disk. Modes:
``header`` (data.filters.integrity_decode=false), ``decode`` (full decode of every image) and ``decode+hash``
(the default config: full decode plus the sha256 content hash that de-duplication needs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgpo_core.config import load_config  # noqa: E402
from mgpo_core.data.stage import run_filter_stage  # noqa: E402
from mgpo_core.data.synthetic import write_synthetic_split  # noqa: E402

MODES = {
    "header": ["data.filters.integrity_decode=false", "data.filters.dedupe=false"],
    "decode": ["data.filters.integrity_decode=true", "data.filters.dedupe=false"],
    "decode+hash": ["data.filters.integrity_decode=true", "data.filters.dedupe=true"],
}


def ensure_images(data: Path, n: int, width: int, height: int, workers: int) -> Path:
    jsonl = data / "samples.jsonl"
    if jsonl.is_file():
        meta = json.loads((data / "bench.json").read_text()) if (data / "bench.json").is_file() else {}
        if meta == {"n": n, "width": width, "height": height}:
            return jsonl
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    jsonl = write_synthetic_split(data, n, seed=0, width=width, height=height, workers=workers)
    (data / "bench.json").write_text(json.dumps({"n": n, "width": width, "height": height}))
    print(f"generated {n} images of {width}x{height} in {time.perf_counter() - t0:.0f}s")
    return jsonl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--width", type=int, default=3840)
    p.add_argument("--height", type=int, default=2160)
    p.add_argument("--workers", type=int, default=2, help="image-check threads (data.filters.workers)")
    p.add_argument("--data", default="/tmp/mgpo-bench-filter-data")
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode (the best is reported)")
    args = p.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average at start {os.getloadavg()[0]:.1f} (other work on the machine slows every mode)"
    )
    jsonl = ensure_images(Path(args.data), args.images, args.width, args.height, args.workers)
    total_mb = 0.0
    for line in jsonl.read_text().splitlines():  # warm the page cache: time the checks, not the disk
        path = json.loads(line)["image_path"]
        with open(path, "rb") as f:
            total_mb += len(f.read()) / 1e6
    print(f"{args.images} rows, {total_mb / args.images:.2f} MB per image, {args.workers} check threads\n")
    out = Path(tempfile.mkdtemp(prefix="mgpo-bench-filter-"))
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        # Modes interleaved, the order reversed every other round, best of --rounds each: load from other
        # processes then hits every mode alike. CPU seconds (all threads) are reported beside wall time
        # because they barely move when the machine is shared.
        for r in range(args.rounds):
            for mode, overrides in list(MODES.items())[:: 1 if r % 2 == 0 else -1]:
                cfg = load_config(
                    "tiny-cpu",
                    [f"state_dir={out / 'state'}", f"data.filters.workers={args.workers}", *overrides],
                )
                t0, c0 = time.perf_counter(), time.process_time()
                result = run_filter_stage(cfg, [jsonl], out / f"{mode}-{r}", progress=False)
                took, used = time.perf_counter() - t0, time.process_time() - c0
                assert result.report["counts"]["kept"] == args.images, result.report["counts"]
                wall[mode] = min(wall.get(mode, took), took)
                cpu[mode] = min(cpu.get(mode, used), used)
                print(
                    f"round {r + 1}  {mode:12s} {took:8.2f}s wall {args.images / took:9.1f} rows/s   "
                    f"{used * 1000 / args.images:8.3f} CPU-ms/row"
                )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rates = {mode: args.images / t for mode, t in wall.items()}
    print(f"\nbest of {args.rounds}:")
    for mode, rate in rates.items():
        print(f"  {mode:12s} {rate:9.1f} rows/s   {cpu[mode] * 1000 / args.images:8.3f} CPU-ms/row")
    print(
        f"header-only vs full decode: {rates['header'] / rates['decode']:.1f}x more rows/s, "
        f"{cpu['decode'] / cpu['header']:.1f}x less CPU per row"
    )
    print(
        f"full decode vs decode+hash: {rates['decode'] / rates['decode+hash']:.2f}x rows/s, "
        f"{cpu['decode+hash'] / cpu['decode']:.2f}x CPU per row"
    )
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
