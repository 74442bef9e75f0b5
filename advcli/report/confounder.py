"""The confounder report: Z-hat against a known truth, per-gene fits, the treatment effects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import keys
from ..data import (CovariateEncoding, check_finite_obsm, counts_anndata, encode_treatment, load_counts,
                    sample_labels, size_factors, validate_counts)
from ..errors import InputError
from .plots import loss_curves, pyplot

LOSS_PANELS = [
    {"title": "Generator phase: BCE, NB (per gene) and weighted total", "ylabel": "loss",
     "phases": ("generator", "joint"), "symlog": True,
     "series": [("total", "total (weighted)"), ("bce", "BCE"), ("nb", "NB")]},
    {"title": "Head phase", "ylabel": "loss", "phases": ("heads",),
     "series": [("bce", "BCE (classifier)"), ("nb", "NB (per gene)")]},
]


# ---------------------------------------------------------------- confounder mode


def confounder_report(adata, folder: Path, payload: dict | None) -> dict[str, Any]:
    from ..metrics import auroc_matched, columnwise_pearson, match_latents, ols_line

    for key, where in ((keys.Z_HAT, adata.obsm), (keys.Z_PROB, adata.obsm)):
        if key not in where:
            raise InputError(f"obsm['{key}'] is missing: the file was not written by "
                             "`advcli predict` with a confounder model.")
    if keys.D_LOGIT not in adata.obs:
        raise InputError(f"obs['{keys.D_LOGIT}'] is missing: the file was not written by "
                         "`advcli predict` with a confounder model.")
    if keys.NB_MEAN not in adata.layers:
        raise InputError(f"layers['{keys.NB_MEAN}'] is missing: the per-gene report compares each "
                         "gene's counts with the model's NB means. Run `advcli predict` again "
                         "without --no-nb-mean.")
    z_hat = check_finite_obsm(adata, keys.Z_HAT, "Z-hat")
    z_prob = check_finite_obsm(adata, keys.Z_PROB, "Z probabilities")
    d_logit = pd.to_numeric(adata.obs[keys.D_LOGIT], errors="coerce").to_numpy(float)
    if not np.isfinite(d_logit).all():
        raise InputError(f"obs['{keys.D_LOGIT}'] holds NaN, infinite or non-numeric values: "
                         "the model that wrote it diverged, or the file was edited.")
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    headline: dict[str, Any] = {}
    plt = pyplot()

    if keys.Z_TRUE in adata.obsm:
        z_true = np.asarray(adata.obsm[keys.Z_TRUE], dtype=float)
        order, signed = match_latents(z_hat, z_true)
        metrics["abs_r_z"] = np.abs(signed).tolist()
        metrics["r_z_signed"] = signed.tolist()
        metrics["z_matching"] = order.tolist()
        metrics["auroc_z"] = auroc_matched(z_prob, z_true, order, signed)
        metrics["z_note"] = ("Z is identified only up to sign and permutation: |r| after the best "
                             "matching of estimated to true columns.")
        headline["|r(Z-hat, Z)|"] = float(np.mean(np.abs(signed)))
        _z_plot(plt, z_true[:, 0], z_hat[:, order[0] if order[0] >= 0 else 0],
                folder / "z_vs_true.png", ols_line)
    else:
        notes.append(f"No obsm['{keys.Z_TRUE}']: Z-hat is not compared with a true Z.")
    follows = z_hat_associations(adata, z_hat)
    if not follows.empty:
        follows.to_csv(folder / "z_hat_associations.csv", index=False)
        _follows_plot(plt, follows, folder / "z_hat_follows.png")
        top = follows.sort_values("strength", ascending=False).groupby("z_column").head(1)
        metrics["z_hat_follows"] = {f"Z_hat[{int(r.z_column)}]": {
            "obs": r.obs_column, "measure": r.measure, "strength": float(r.strength)}
            for r in top.itertuples()}
        shown = top.nlargest(3, "strength")
        headline["Z-hat follows"] = "; ".join(
            f"[{int(r.z_column)}] {r.obs_column} ({r.measure} {r.strength:.2f})"
            for r in shown.itertuples()) + (" (all: z_hat_follows.png)"
                                             if len(top) > len(shown) else "")

    if keys.LOG_MU_TRUE in adata.layers:
        log_mu_hat = np.log(np.asarray(adata.layers[keys.NB_MEAN], dtype=float).clip(1e-30))
        r_genes = columnwise_pearson(log_mu_hat, np.asarray(adata.layers[keys.LOG_MU_TRUE]))
        pd.DataFrame({"gene": adata.var_names, "r": r_genes}).to_csv(
            folder / "per_gene_correlation.csv", index=False)
        metrics["per_gene_r_mean"] = float(np.nanmean(r_genes))
        metrics["per_gene_r_median"] = float(np.nanmedian(r_genes))
        headline["mean per-gene r(log mu)"] = metrics["per_gene_r_mean"]
        _hist_plot(plt, r_genes, folder / "per_gene_correlation_hist.png")
    else:
        notes.append(f"No layers['{keys.LOG_MU_TRUE}']: per-gene correlations skipped.")

    if keys.LOGIT_D_TRUE in adata.obs:
        slope, icpt, r = ols_line(adata.obs[keys.LOGIT_D_TRUE], adata.obs[keys.D_LOGIT])
        metrics["d_logit_r"] = r
        metrics["d_logit_slope"] = slope
        _d_logit_plot(plt, adata.obs[keys.LOGIT_D_TRUE].to_numpy(float),
                      adata.obs[keys.D_LOGIT].to_numpy(float), folder / "d_logit_vs_true.png",
                      (slope, icpt, r))
    else:
        notes.append(f"No obs['{keys.LOGIT_D_TRUE}']: the D-logit plot is skipped.")

    if payload is not None:
        loss_curves(payload["history"], LOSS_PANELS, folder / "loss_curves.png", notes)
    else:
        notes.append("No --model given: loss_curves.png needs the model file's history.")

    effects = _effects(adata, z_hat, metrics, notes, headline)
    if effects is not None:
        effects.to_csv(folder / "treatment_effects.csv", index=False)
        _effects_plot(plt, effects, folder / "treatment_effects.png")
    return {"metrics": metrics, "headline": headline, "notes": notes}


MAX_LEVELS = 50  # a categorical obs column with more levels is not a grouping to compare


def z_hat_associations(adata, z_hat: np.ndarray) -> pd.DataFrame:
    """How strongly each Z-hat column follows each obs column and the log library size: |Spearman
    rho| for numeric columns, the correlation ratio eta (the share of Z-hat's spread between the
    groups, square-rooted) for categorical ones. On real data this says what the inferred
    confounder is: a donor, a chemistry, sequencing depth, a cell type."""
    from scipy.stats import spearmanr

    columns: dict[str, tuple[str, np.ndarray]] = {}
    try:
        library = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
        if np.isfinite(library).all() and (library > 0).all():
            columns["log library size"] = ("numeric", np.log(library))
    except (TypeError, ValueError):
        pass
    skip = {keys.D_LOGIT, keys.D_PROB, keys.LOGIT_D_TRUE, keys.LOG_LIK_Y}  # advcli's own
    for name in adata.obs.columns:
        col = adata.obs[name]
        if name in skip or col.isna().any():
            continue
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            values = col.to_numpy(float)
            if np.isfinite(values).all() and len(np.unique(values)) > MAX_LEVELS:
                columns[str(name)] = ("numeric", values)
                continue
        levels = col.astype(str).to_numpy()
        if 2 <= len(np.unique(levels)) <= MAX_LEVELS:
            columns[str(name)] = ("categorical", levels)
    rows = []
    for j in range(z_hat.shape[1]):
        z = z_hat[:, j].astype(float)
        if np.std(z) == 0:
            continue
        for name, (kind, values) in columns.items():
            if kind == "numeric":
                rho = spearmanr(z, values)[0]
                rows.append((j, name, "|Spearman|", abs(float(np.nan_to_num(rho)))))
            else:
                groups = pd.Series(z).groupby(values)
                between = float((groups.size() * (groups.mean() - z.mean()) ** 2).sum())
                rows.append((j, name, "eta", float(np.sqrt(between / ((z - z.mean()) ** 2).sum()))))
    return pd.DataFrame(rows, columns=["z_column", "obs_column", "measure", "strength"])


def _follows_plot(plt, follows: pd.DataFrame, path: Path) -> None:
    """A heatmap: obs columns (the 15 strongest) x Z-hat columns, the strength written in."""
    table = follows.pivot_table(index=["obs_column", "measure"], columns="z_column",
                                values="strength")
    table = table.loc[table.max(axis=1).sort_values(ascending=False).index[:15]]
    fig, ax = plt.subplots(figsize=(3.6 + 0.7 * table.shape[1], 1.2 + 0.4 * table.shape[0]))
    image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 else "black")
    ax.set_xticks(range(table.shape[1]), [f"Z_hat[{int(c)}]" for c in table.columns],
                  rotation=45, ha="right")
    ax.set_yticks(range(table.shape[0]), [f"{o} ({m})" for o, m in table.index])
    ax.set_title("What Z-hat follows")
    fig.colorbar(image, ax=ax, label="|Spearman rho| or correlation ratio eta")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # room for the obs names, however long
    plt.close(fig)


def _effects(adata, z_hat, metrics, notes, headline) -> pd.DataFrame | None:
    from ..effects import treatment_effects

    inputs = adata.uns.get(keys.UNS, {}).get(keys.CONFOUNDER_INPUTS)
    if not isinstance(inputs, dict):
        notes.append("No record of the treatment and covariates: treatment effects skipped.")
        return None
    layer = str(inputs.get("layer", "")) or None
    source = counts_anndata(adata, layer)
    validate_counts(source, layer)
    d, _ = encode_treatment(adata, str(inputs["treatment_key"]), str(inputs["treated_level"]))
    if "covariates_json" in inputs:
        encoding = CovariateEncoding.from_dict(json.loads(str(inputs["covariates_json"])))
    else:  # files predicted before the encoding was stored as JSON
        cov = inputs["covariates"]
        encoding = CovariateEncoding.from_dict({k: _as_list(cov[k])
                                                for k in ("keys", "kinds", "levels")})
    x = encoding.transform(adata)
    counts = load_counts(source, layer)
    sf = size_factors(adata, counts, str(inputs.get("size_factors", "none")))
    sample_key = str(inputs.get("sample_key", "")) or None
    sample = None if sample_key is None else sample_labels(adata.obs, sample_key)
    controls = json.loads(str(inputs.get("control_genes_json", "[]"))) or None
    frame = treatment_effects(counts, d, x, z_hat, source.var_names, sf, sample,
                              control_genes=controls)
    sim = adata.uns.get(keys.UNS, {}).get(keys.SIMULATION)
    if isinstance(sim, dict) and "beta_2" in sim:
        truth = np.asarray(sim["beta_2"])[x.shape[1]]  # the D row of beta_2
        frame["effect_true"] = truth
        for name in ("naive", "adjusted"):
            err = frame[f"effect_{name}"].to_numpy() - truth
            metrics[f"effect_rmse_{name}"] = float(np.sqrt(np.nanmean(err ** 2)))
            metrics[f"effect_bias_{name}"] = float(np.nanmean(err))
        half = 1.959964 * frame["se_adjusted"].to_numpy()
        cover = np.abs(frame["effect_adjusted"].to_numpy() - truth) <= half
        metrics["effect_ci95_coverage_adjusted"] = float(np.nanmean(cover))
        headline["effect RMSE naive / adjusted"] = (
            f"{metrics['effect_rmse_naive']:.3f} / {metrics['effect_rmse_adjusted']:.3f}")
    k = z_hat.shape[1]
    if k >= 2:  # sensitivity to k: the same table with the first half of Z-hat's columns
        half = treatment_effects(counts, d, x, z_hat[:, :k // 2], source.var_names, sf, sample,
                                 control_genes=controls)
        both = frame["converged"].to_numpy() & half["converged"].to_numpy()
        from scipy.stats import spearmanr

        rho = float(spearmanr(frame["effect_adjusted"][both], half["effect_adjusted"][both])[0])
        change = float(np.median(np.abs(frame["effect_adjusted"][both]
                                        - half["effect_adjusted"][both])))
        metrics["k_sensitivity"] = {"k": k, "k_half": k // 2, "spearman": rho,
                                    "median_abs_change": change}
        headline[f"effects with k = {k} vs {k // 2}: Spearman"] = round(rho, 3)
        if rho < 0.8:
            notes.append(f"The adjusted effects change with the number of Z-hat columns "
                         f"(Spearman {rho:.2f} between k = {k} and k = {k // 2}): read them "
                         "with care, or anchor Z-hat with --control-genes.")
    metrics["z_deviance_explained"] = frame.attrs["z_deviance_explained"]
    metrics["effect_inflation"] = frame.attrs["inflation"]
    metrics["genes_not_tested"] = int((~frame["converged"]).sum())
    headline["deviance explained by Z-hat"] = f"{frame.attrs['z_deviance_explained']:.1%}"
    if frame.attrs["z_deviance_explained"] < 0.01:
        notes.append("Z-hat explains under 1% of the counts' deviance beyond [X, D]: it captured "
                     "little, and the adjusted effects are close to the naive ones.")
    if frame.attrs["inflation"] > 3:
        notes.append(f"The adjusted Wald statistics are inflated (median chi-square "
                     f"{frame.attrs['inflation']:.1f} x its null value): unless most genes "
                     "respond to the treatment, p-values are too small; consider --sample-key "
                     "to test on samples rather than cells.")
    metrics["genes_q_below_0.05"] = int((frame["qvalue"] < 0.05).sum())
    headline["genes with q < 0.05"] = metrics["genes_q_below_0.05"]
    return frame


def _as_list(value):
    if isinstance(value, np.ndarray):
        return [_as_list(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_as_list(v) for v in value]
    return value


def _z_plot(plt, z_true, z_hat, path, ols_line):
    rng = np.random.default_rng(0)
    x = z_true + rng.uniform(-0.08, 0.08, z_true.size)
    slope, icpt, r = ols_line(z_true, z_hat)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(x, z_hat, s=10, alpha=0.5)
    line = np.linspace(z_true.min(), z_true.max(), 50)  # the fit only where there are data
    ax.plot(line, icpt + slope * line, ls=":", color="orange", lw=2, label="OLS fit")
    ax.set_xticks([0, 1], ["Z = 0", "Z = 1"])
    ax.set_xlim(-0.4, 1.4)
    ax.set_xlabel("true Z (jittered)")
    ax.set_ylabel("estimated Z-hat")
    ax.set_title(f"Z-hat vs true Z: Pearson r = {r:.3f} (sign of Z is arbitrary)")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hist_plot(plt, r, path):
    from matplotlib.ticker import MaxNLocator

    r = r[np.isfinite(r)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(r, bins=30, color="tab:blue", alpha=0.85)
    ax.set_xlabel("per-gene Pearson r, predicted vs true log mean")
    ax.set_ylabel("genes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Per-gene correlations: mean {np.mean(r):.3f}, median {np.median(r):.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _d_logit_plot(plt, true, pred, path, line):
    slope, icpt, r = line
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(true, pred, s=10, alpha=0.5)
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    if hi - lo < 1e-6:
        lo, hi = lo - 1, hi + 1
    ax.plot([lo, hi], [lo, hi], ls="--", color="k", lw=1, label="y = x")
    grid = np.linspace(float(true.min()), float(true.max()), 50)
    ax.plot(grid, icpt + slope * grid, ls=":", color="orange", lw=2, label="OLS fit")
    ax.set_xlabel("true logit of D")
    ax.set_ylabel("predicted logit of D")
    r_text = "undefined (true logit constant)" if not np.isfinite(r) else f"{r:.3f}"
    ax.set_title(f"Predicted vs true D logits: r = {r_text}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _robust_limits(values: np.ndarray, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits from the 0.5-99.5% quantiles: one diverged gene cannot stretch the plot."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return -1.0, 1.0
    lo, hi = np.quantile(v, [0.005, 0.995])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = max(hi - lo, 1e-6)
    return lo - pad * span, hi + pad * span


def _clipped(ax, x, y, xlim, ylim, **kw):
    """Scatter with points outside the limits drawn on the edge as triangles."""
    inside = (x >= xlim[0]) & (x <= xlim[1]) & (y >= ylim[0]) & (y <= ylim[1])
    if isinstance(kw.get("c"), np.ndarray):
        kw = {**kw, "c": kw["c"][inside]}
    ax.scatter(x[inside], y[inside], **kw)
    out = ~inside & np.isfinite(x) & np.isfinite(y)
    if out.any():
        ax.scatter(np.clip(x[out], *xlim), np.clip(y[out], *ylim), marker="^", s=18,
                   color="black", alpha=kw.get("alpha", 1.0),
                   label=f"{int(out.sum())} beyond the axes (at the edge)")
        ax.legend(loc="best", fontsize=8)


def _effects_plot(plt, frame, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    naive, adj = frame["effect_naive"].to_numpy(), frame["effect_adjusted"].to_numpy()
    ax = axes[0]
    lim = _robust_limits(np.concatenate([naive, adj]))
    _clipped(ax, naive, adj, lim, lim, s=10, alpha=0.6)
    ax.plot(lim, lim, "k--", lw=1)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("naive effect of D (log fold change, [X, D])")
    ax.set_ylabel("adjusted effect of D ([X, D, Z-hat])")
    ax.set_title("Treatment effect per gene")
    ax = axes[1]
    q = frame["qvalue"].to_numpy()
    tested = frame["converged"].to_numpy(bool) & np.isfinite(frame["pvalue"].to_numpy())
    logp = -np.log10(np.clip(frame["pvalue"].to_numpy(), 1e-300, 1))
    xlim = _robust_limits(adj[tested])
    top = np.nanquantile(logp[tested], 0.995) if tested.any() else 1.0
    ylim = (0.0, max(top * 1.1, 2.0))
    colours = np.where(q[tested] < 0.05, "tab:red", "tab:gray")
    _clipped(ax, adj[tested], logp[tested], xlim, ylim, s=10, c=colours, alpha=0.7)
    best = frame[tested].assign(q=q[tested]).nsmallest(8, "q")
    for _, row in best.iterrows():
        ax.annotate(str(row["gene"]), (np.clip(row["effect_adjusted"], *xlim),
                                       min(-np.log10(max(row["pvalue"], 1e-300)), ylim[1])),
                    fontsize=7)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    ax.set_xlabel("adjusted effect of D (natural-log fold change)")
    ax.set_ylabel("-log10 p")
    ax.set_title(f"Adjusted effects (red: q < 0.05; {int((~tested).sum())} genes not tested)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
