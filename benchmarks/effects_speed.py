"""Speed of the vectorised NB GLM behind treatment_effects.csv, up to 100,000 cells x 2,000 genes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/effects_speed.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/effects_speed.py --sizes 100000x2000

Data: NB counts around log mu = 1 + 0.3 X + effect D + 0.8 Z with 5 binary covariates; the naive
and adjusted fits of diagnose are timed together, and the adjusted effects compared with the
truth so a fast but wrong fit would show.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.sparse as sp

from advcli.effects import treatment_effects


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000x500,100000x2000")
    args = parser.parse_args(argv)
    print(f"{'cells':>9}{'genes':>7}{'wall s':>9}{'cpu s':>9}{'genes/s':>9}"
          f"{'effect RMSE':>13}{'converged':>11}")
    for size in args.sizes.split(","):
        n, g = (int(v) for v in size.split("x"))
        rng = np.random.default_rng(0)
        x = (rng.random((n, 5)) < 0.5).astype(float)
        z = (rng.random((n, 1)) < 0.5).astype(float)
        d = (rng.random(n) < 1 / (1 + np.exp(-(z[:, 0] - 0.5)))).astype(float)
        effect = rng.normal(0, 0.5, g)
        counts = []
        for start in range(0, n, 10000):  # build CSR in blocks, as real data would be
            s = slice(start, min(start + 10000, n))
            log_mu = 1.0 + 0.3 * x[s].sum(1, keepdims=True) \
                + d[s, None] * effect + 0.8 * z[s]
            mu = np.exp(log_mu)
            counts.append(sp.csr_matrix(rng.poisson(rng.gamma(3.0, mu / 3.0)).astype(np.float32)))
        y = sp.vstack(counts, format="csr")
        wall, cpu = time.perf_counter(), time.process_time()
        frame = treatment_effects(y, d, x, z, [f"g{i}" for i in range(g)])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rmse = float(np.sqrt(np.mean((frame["effect_adjusted"] - effect) ** 2)))
        print(f"{n:>9,}{g:>7}{wall:>9.1f}{cpu:>9.1f}{g / wall:>9.0f}{rmse:>13.4f}"
              f"{frame['converged'].mean():>11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
