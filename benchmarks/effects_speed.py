"""Speed of the vectorised NB GLM behind treatment_effects.csv, up to 100,000 cells x 2,000 genes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/effects_speed.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/effects_speed.py --sizes 20000x1000 --kinds sparse

Data: NB counts around log mu = base + 0.3 X + effect D + 0.8 Z with 5 binary covariates; the naive
and adjusted fits of diagnose are timed together, and the adjusted effects compared with the
truth so a fast but wrong fit would show. Two kinds of genes: "dense" (base 1 for every gene)
and "sparse" (base drawn from N(-1.5, 1.5), as on real counts where most genes are rare, and
1 % of the genes never seen in treated cells, which a GLM separates).
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
    parser.add_argument("--kinds", default="dense,sparse")
    args = parser.parse_args(argv)
    print(f"{'cells':>9}{'genes':>7}{'kind':>8}{'wall s':>9}{'cpu s':>9}{'genes/s':>9}"
          f"{'effect RMSE':>13}{'converged':>11}")
    for size, kind in ((sz, k) for sz in args.sizes.split(",") for k in args.kinds.split(",")):
        n, g = (int(v) for v in size.split("x"))
        rng = np.random.default_rng(0)
        x = (rng.random((n, 5)) < 0.5).astype(float)
        z = (rng.random((n, 1)) < 0.5).astype(float)
        d = (rng.random(n) < 1 / (1 + np.exp(-(z[:, 0] - 0.5)))).astype(float)
        effect = rng.normal(0, 0.5, g)
        base = np.ones(g) if kind == "dense" else rng.normal(-1.5, 1.5, g)
        separated = np.arange(g) < (0 if kind == "dense" else max(1, g // 100))
        counts = []
        for start in range(0, n, 10000):  # build CSR in blocks, as real data would be
            s = slice(start, min(start + 10000, n))
            log_mu = base + 0.3 * x[s].sum(1, keepdims=True) \
                + d[s, None] * effect + 0.8 * z[s]
            mu = np.exp(log_mu)
            mu[np.ix_(d[s] == 1, separated)] = 0.0
            counts.append(sp.csr_matrix(rng.poisson(rng.gamma(3.0, mu / 3.0)).astype(np.float32)))
        y = sp.vstack(counts, format="csr")
        wall, cpu = time.perf_counter(), time.process_time()
        frame = treatment_effects(y, d, x, z, [f"g{i}" for i in range(g)])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        scored = frame["converged"].to_numpy() & ~separated
        rmse = float(np.sqrt(np.mean((frame["effect_adjusted"] - effect)[scored] ** 2)))
        print(f"{n:>9,}{g:>7}{kind:>8}{wall:>9.1f}{cpu:>9.1f}{g / wall:>9.0f}{rmse:>13.4f}"
              f"{frame['converged'].mean():>11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
