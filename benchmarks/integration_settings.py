"""Train integrate mode with chosen settings on one file and print the scIB-style metrics.

The development runs behind the defaults in docs/integrate.md ("Why the defaults are what they
are") were made with this script, e.g.

    advcli simulate integrate -o /tmp/i.h5ad
    OMP_WAIT_POLICY=PASSIVE python benchmarks/integration_settings.py /tmp/i.h5ad \\
        "dict(adv_loss='uniform', adv_weight=10)" "dict(adv_weight=3)"

Each argument is one set of IntegrationModel options (a Python dict literal); one line per set.
With `--seeds N` each set is trained with seeds 0..N-1 and a mean and sd line follows, to tell a
setting's effect from seed-to-seed variation.
"""

from __future__ import annotations

import argparse
import ast
import time

import anndata as ad
import numpy as np
import torch

from advcli import IntegrationModel
from advcli.metrics import integration_metrics

SHOWN = ("ilisi", "batch_asw", "label_asw", "ari", "bio_score", "batch_score", "overall_score")


def options(text: str) -> dict:
    """`dict(a=1)` or `{'a': 1}` -> a dict, without evaluating arbitrary code."""
    node = ast.parse(text, mode="eval").body
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict" and not node.args:
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    return dict(ast.literal_eval(node))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help=".h5ad with raw counts")
    parser.add_argument("settings", nargs="+", help="IntegrationModel options, e.g. dict(seed=1)")
    parser.add_argument("--label-key", default="cell_type")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seeds", type=int, default=1, help="train each set with seeds 0..N-1")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    a = ad.read_h5ad(args.data)
    for text in args.settings:
        base, runs = options(text), []
        for seed in range(args.seeds):
            opts = {**base, "seed": seed} if args.seeds > 1 else base
            start = time.perf_counter()
            model = IntegrationModel(a, **opts).train()
            wall = time.perf_counter() - start
            batch_key = model.config.batch_key
            met = integration_metrics(model.get_latent_representation(),
                                      a.obs[batch_key].to_numpy(), a.obs[args.label_key].to_numpy())
            runs.append(met)
            print(opts, f"epochs {model.summary_['epochs']}", f"{wall:.1f} s",
                  {k: round(met[k], 3) for k in SHOWN}, flush=True)
        if len(runs) > 1:
            print(text, f"mean (sd) of {len(runs)} seeds",
                  {k: f"{np.mean([r[k] for r in runs]):.3f} ({np.std([r[k] for r in runs], ddof=1):.3f})"
                   for k in SHOWN}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
