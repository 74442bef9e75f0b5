"""Peak memory and time of `advcli simulate` as n grows: counts are streamed, never dense.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/simulate_scale.py                 # up to 2e5 cells
    OMP_WAIT_POLICY=PASSIVE python benchmarks/simulate_scale.py --sizes 1000000  # the 10^6 case

Each size runs the real command in a fresh process and reads its peak resident memory from
getrusage; the dense float64 n x genes matrix it never builds is printed beside it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CHILD = """
import resource, runpy, sys
sys.argv = ["advcli"] + sys.argv[1:]
try:
    runpy.run_module("advcli.cli", run_name="__main__")
except SystemExit as exc:
    if exc.code:
        raise
usage = resource.getrusage(resource.RUSAGE_SELF)
print(usage.ru_maxrss, usage.ru_utime + usage.ru_stime)
"""


def run(args: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak resident MB) of one advcli command in its own process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kb, cpu = done.stdout.split()[-2:]
    return wall, float(cpu), float(peak_kb) / 1024.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,200000")
    parser.add_argument("--genes", type=int, default=2000)
    args = parser.parse_args(argv)
    print(f"{'command':<22}{'cells':>10}{'genes':>7}{'wall s':>9}{'cpu s':>9}{'peak MB':>9}"
          f"{'file MB':>9}{'dense f64 MB':>14}{'peak/dense':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            for kind in ("integrate", "confounder"):
                out = Path(tmp) / f"{kind}_{n}.h5ad"
                if kind == "integrate":
                    cmd = ["simulate", kind, "-o", str(out), "--n-a", str(n // 2), "--n-b",
                           str(n - n // 2), "--genes", str(args.genes)]
                else:
                    cmd = ["simulate", kind, "-o", str(out), "--n", str(n), "--genes",
                           str(args.genes)]
                wall, cpu, peak = run(cmd)
                dense = n * args.genes * 8 / 2 ** 20
                size = out.stat().st_size / 2 ** 20
                print(f"simulate {kind:<13}{n:>10,}{args.genes:>7}{wall:>9.1f}{cpu:>9.1f}"
                      f"{peak:>9.0f}{size:>9.0f}{dense:>14.0f}{peak / dense:>12.3f}", flush=True)
                out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
