"""Metrics against the truth (confounder mode) and of mixing and conservation (integrate mode)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of two (cells x genes) arrays; NaN for constant ones."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a0 = a - a.mean(axis=0)
    b0 = b - b.mean(axis=0)
    den = np.sqrt((a0 ** 2).sum(axis=0) * (b0 ** 2).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (a0 * b0).sum(axis=0) / den, np.nan)


def match_latents(z_hat: np.ndarray, z_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z is identified only up to sign and permutation: pair each true column with the estimated
    column of largest |r| (Hungarian matching for k > 1). Returns (order, signed r per true column).
    """
    k_hat, k = z_hat.shape[1], z_true.shape[1]
    r = np.zeros((k, k_hat))
    for i in range(k):
        for j in range(k_hat):
            r[i, j] = np.nan_to_num(columnwise_pearson(z_true[:, [i]], z_hat[:, [j]])[0])
    rows, cols = linear_sum_assignment(-np.abs(r))
    order = np.full(k, -1)
    order[rows] = cols
    signed = np.array([r[i, order[i]] if order[i] >= 0 else np.nan for i in range(k)])
    return order, signed


def auroc_matched(z_prob: np.ndarray, z_true: np.ndarray, order: np.ndarray,
                  signs: np.ndarray) -> list[float]:
    """AUROC of each matched Z probability for its true binary Z (sign-flipped where r < 0)."""
    from sklearn.metrics import roc_auc_score

    out = []
    for i, j in enumerate(order):
        truth = z_true[:, i]
        if j < 0 or len(np.unique(truth)) < 2:
            out.append(float("nan"))
            continue
        score = z_prob[:, j] if signs[i] >= 0 else 1.0 - z_prob[:, j]
        out.append(float(roc_auc_score(truth, score)))
    return out


def ols_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, Pearson r) of the least-squares line of y on x."""
    x = np.asarray(x, float).ravel()
    y = np.asarray(y, float).ravel()
    if x.std() == 0 or y.std() == 0:
        return 0.0, float(y.mean()), float("nan")
    r = float(np.corrcoef(x, y)[0, 1])
    slope = r * y.std() / x.std()
    return float(slope), float(y.mean() - slope * x.mean()), r


# ---------------------------------------------------------------- integrate mode (scIB definitions)

# Below this share of the iLISI that random mixing of the same domain sizes gives, the domains
# are called unmixed: failed integrations measured 0.00-0.04 (of 1 for equal domains), working
# ones 0.2-0.8, and an unadversarial shared VAE 0.27 (docs/integrate.md).
UNMIXED_ILISI = 0.1
UNMIXED_ADVICE = ("Refit with a higher --adv-weight or --adversary alternate, or --n-top-genes "
                  "2000 on data with many genes, and check the result with `advcli diagnose`.")


def domain_shares(codes: np.ndarray, n_domains: int) -> np.ndarray:
    """Each domain's share of the cells (domain codes 0..n_domains-1)."""
    return np.bincount(codes, minlength=n_domains) / len(codes)


def random_mixing_ilisi(codes: np.ndarray, n_domains: int) -> float:
    """The scIB-normalised iLISI that random mixing of domains of these sizes gives (the inverse
    Simpson index of their overall shares): 1 for equal domains, 0.20 for a 10:1 pair. Unequal
    domains cannot reach 1, so a fit is judged against this, not against 1."""
    if n_domains < 2:
        return float("nan")
    shares = domain_shares(codes, n_domains)
    return float((1.0 / (shares ** 2).sum() - 1.0) / (n_domains - 1.0))


def is_unmixed(ilisi: float, random_mixing: float) -> bool:
    """Whether a median iLISI is below UNMIXED_ILISI of what random mixing would give."""
    return bool(ilisi < UNMIXED_ILISI * random_mixing)


def unmixed_note(ilisi: float, random_mixing: float, detail: str = "") -> str:
    """What the fit summary and diagnose say when ``is_unmixed``; ``detail`` adds to the
    figures before the advice."""
    return (f"The domains are not mixed: the embedding has iLISI {ilisi:.2f}, where random "
            f"mixing of these domains' sizes would give {random_mixing:.2f} and 0 means each "
            f"cell's neighbours all come from its own domain{detail}. {UNMIXED_ADVICE}")


def knn(embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances and indices of each cell's k nearest other cells (scikit-learn)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, embedding.shape[0] - 1)
    dist, idx = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    return dist[:, 1:], idx[:, 1:]


def neighbour_shares(idx: np.ndarray, codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Each cell's share of neighbours (rows of ``idx``) carrying each code: cells x n_codes."""
    return np.stack([(codes[idx] == b).mean(axis=1) for b in range(n_codes)], axis=1)


def knn_domain_entropy(idx: np.ndarray, codes: np.ndarray, n_domains: int,
                       per_cell: bool = False):
    """Mean entropy of the domains among each cell's neighbours (``idx``), over log(n_domains):
    0 when every neighbourhood is from one domain, 1 when each holds the domains equally
    (``per_cell``: each cell's value instead of the mean)."""
    if n_domains < 2:
        return np.full(len(idx), np.nan) if per_cell else float("nan")
    shares = neighbour_shares(idx, codes, n_domains)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1) / np.log(n_domains)
    return ent if per_cell else float(ent.mean())


PARTLY_MIXED = 0.5  # mixing_fraction below this: most cells' neighbourhoods hold under half
                   # the domain diversity of random mixing (development suite: 0.96-0.98 on
                   # fits that mixed, 0.66 where lineages are missing from some domains, 0.46
                   # for a one-VAE-per-domain fit with iLISI 0.17 that no other check caught)


def partly_mixed_note(fraction: float) -> str:
    """What the fit summary and diagnose say when mixing_fraction is below PARTLY_MIXED."""
    return (f"The domains are only partly mixed: the typical cell's neighbourhood holds "
            f"{fraction:.0%} of the domain diversity that random mixing of these domains would "
            f"give. Unless most cell types exist in one domain only, the adversary did not "
            f"finish its work. {UNMIXED_ADVICE}")


def ilisi_by_domain(ilisi_per_cell: np.ndarray, batch: np.ndarray,
                    n_domains: int | None = None) -> dict[str, float]:
    """Each domain's median iLISI (scIB-normalised) over its own cells. Where one domain holds
    cell types the others lack, most cells can lie apart from other domains in a fit that
    worked: the typical cell of the other domains still has neighbours from it."""
    names = np.unique(batch)
    k = n_domains or len(names)
    if k < 2:
        return {}
    return {str(name): float((np.median(ilisi_per_cell[batch == name]) - 1.0) / (k - 1.0))
            for name in names}


ACTIVE_VARIANCE = 0.01  # a latent dimension whose posterior means vary over the cells by less
                        # than this (the prior's variance is 1) is inactive (Burda et al. 2016)


def active_dimensions(embedding: np.ndarray) -> int:
    """The latent dimensions along which the cells' posterior means vary by more than
    ACTIVE_VARIANCE: the dimensions the embedding uses. None means a collapsed latent space,
    every cell at nearly one point, whatever fine structure the neighbourhoods still find."""
    return int((np.asarray(embedding, dtype=np.float64).var(axis=0) > ACTIVE_VARIANCE).sum())


def collapsed_note(n_dims: int, weighted: bool | None = None) -> str:
    """What the fit summary and diagnose say when ``active_dimensions`` is zero; ``weighted``:
    whether the adversary had composition weights (None: not known)."""
    advice = {True: "--composition-clusters 0 (the adversary unweighted)",
              False: "a lower --adv-weight",
              None: "--composition-clusters 0 (the adversary unweighted) or, if it was, a "
                    "lower --adv-weight"}[weighted]
    return (f"The latent space collapsed: in none of its {n_dims} dimensions do the cells' "
            f"posterior means vary by more than a standard deviation of "
            f"{ACTIVE_VARIANCE ** 0.5:.1f} (the prior's is 1), so every cell sits at nearly the "
            "same point, the embedding carries no cell types, and its mixing figures mean "
            "nothing; most likely the adversary made the cells alike while the decoder explained "
            f"the counts by the domain alone. Refit with {advice}, and check the result with "
            "`advcli diagnose`.")


def _medians(domains: dict[str, float]) -> str:
    return ", ".join(f"{d} {v:.2f}" for d, v in domains.items())


def most_cells_apart_note(ilisi: float, random_mixing: float, mixed: dict[str, float],
                          apart: list[str]) -> str:
    """What the fit summary and diagnose say when most cells lie apart from other domains but
    the typical cell of some domains (``mixed``) does not: not a lost adversary, or not only."""
    one = len(apart) == 1
    return (f"Most cells have no neighbours from another domain (iLISI {ilisi:.2f}, where random "
            f"mixing of these domains' sizes would give {random_mixing:.2f}), but the typical "
            f"cell of {', '.join(mixed)} does (median iLISI of its own cells: {_medians(mixed)}). "
            f"So {', '.join(apart)} {'holds' if one else 'hold'} cell states that the other "
            "domains lack (a reference beside a query that holds some of its cell types looks "
            f"like this), or part of {'it' if one else 'them'} did not mix. Check which cell "
            "types stay apart with `advcli diagnose` and labels; a higher --adv-weight is right "
            "only if those types exist in the other domains too.")


def minority_apart_note(random_mixing: float, apart: dict[str, float]) -> str:
    """What the fit summary and diagnose say when the typical cell is mixed but the typical cell
    of some domains (``apart``), a minority the overall median passes over, is not."""
    one = len(apart) == 1
    return (f"The typical cell of {', '.join(apart)} has no neighbours from another domain "
            f"(median iLISI of {'its' if one else 'their'} own cells: {_medians(apart)}, where "
            f"random mixing of these domains' sizes would give {random_mixing:.2f}), while the "
            f"other domains mixed. {'It' if one else 'They'} did not mix, or "
            f"{'holds' if one else 'hold'} only cell states that the others lack: check with "
            f"`advcli diagnose` and labels. Where those states exist in the other domains too: "
            f"{UNMIXED_ADVICE}")


def mixing_note(ilisi: float, random_mixing: float, fraction: float,
                by_domain: dict[str, float] | None = None, separated: bool = False,
                detail: str = "") -> str | None:
    """The fit summary's and diagnose's verdict on the mixing, or None where the domains mixed.
    ``by_domain``: each domain's median iLISI over its own cells (``ilisi_by_domain``);
    ``separated``: the discriminator still tells the held-out cells' domains apart (the fit's
    own evidence that the adversary lost); ``detail`` adds to the unmixed note's figures."""
    by_domain = by_domain or {}
    apart = {d: v for d, v in by_domain.items() if is_unmixed(v, random_mixing)}
    mixed = {d: v for d, v in by_domain.items() if d not in apart}
    if separated or is_unmixed(ilisi, random_mixing):
        if mixed and not separated:
            return most_cells_apart_note(ilisi, random_mixing, mixed, list(apart))
        return unmixed_note(ilisi, random_mixing, detail)
    if fraction < PARTLY_MIXED:
        return partly_mixed_note(fraction)
    if apart:
        return minority_apart_note(random_mixing, apart)
    return None


TYPES_KEPT_TOLERANCE = 0.01  # label ASW and cLISI may fall this far below the PCA's
LABEL_METRIC_NAMES = {"clisi": "cLISI", "label_asw": "label ASW"}


def types_less_separated(metrics: dict, baseline: dict) -> list[str]:
    """The label metrics (cLISI, label ASW) on which an integrated embedding falls more than
    TYPES_KEPT_TOLERANCE below the unintegrated PCA: cell types that the counts keep apart
    came together, the known failure of adversarial integration."""
    return [k for k in LABEL_METRIC_NAMES if k in metrics and k in baseline
            and metrics[k] < baseline[k] - TYPES_KEPT_TOLERANCE]


def types_mixed_note(metrics: dict, baseline: dict) -> str:
    """What diagnose says when ``types_less_separated`` names any metric."""
    shown = ", ".join(f"{LABEL_METRIC_NAMES[k]} {metrics[k]:.3f} against {baseline[k]:.3f}"
                      for k in types_less_separated(metrics, baseline))
    return (f"Cell types are less separated than in the unintegrated PCA ({shown}): the "
            "integration brought together cell types that the counts keep apart. This happens "
            "when the domains hold different cell types or proportions and the adversary pulls "
            "them onto each other. Refit with a lower --adv-weight, and with --design shared "
            "if this fit was paired.")


JOINED_SHARE = 0.25  # a type whose cells' neighbours are at least this share another type's ...
JOINED_RISE = 0.2  # ... this much more than in the unintegrated PCA, was laid on that type
JOINED_NEIGHBOURS = 15
JOINED_MIN_CELLS = 2 * JOINED_NEIGHBOURS  # a smaller type's neighbours are others' by necessity
# (docs/integrate.md, "When it did not work": on 16 rows of the suite it names only the two
# types that the adversary aligned, 0.47 against 0.00; elsewhere the largest rise was 0.15)


def types_brought_together(embedding: np.ndarray, baseline: np.ndarray, labels: np.ndarray
                           ) -> list[dict]:
    """Pairs of cell types that the integration laid on one another: at least JOINED_SHARE of
    type a's cells' JOINED_NEIGHBOURS nearest cells are b's, JOINED_RISE more than in the
    unintegrated ``baseline``. cLISI and label ASW average over all types and miss two of many
    types joined, the failure when types are nearly exclusive to different domains and the
    adversary aligns them."""
    names, codes, sizes = np.unique(np.asarray(labels).astype(str), return_inverse=True,
                                    return_counts=True)

    def type_shares(points: np.ndarray) -> np.ndarray:  # [a, b]: mean over a's cells
        _, idx = knn(np.asarray(points, dtype=np.float64), JOINED_NEIGHBOURS)
        per_cell = neighbour_shares(idx, codes, len(names))
        return np.stack([per_cell[codes == a].mean(axis=0) for a in range(len(names))])

    after, before = type_shares(embedding), type_shares(baseline)
    out = []
    for a, b in zip(*np.nonzero((after >= JOINED_SHARE) & (after - before >= JOINED_RISE))):
        if a != b and sizes[a] >= JOINED_MIN_CELLS:
            out.append({"type": str(names[a]), "with": str(names[b]),
                        "share": float(after[a, b]), "share_unintegrated": float(before[a, b])})
    return sorted(out, key=lambda p: -p["share"])


def types_joined_note(pairs: list[dict]) -> str:
    """What diagnose says when ``types_brought_together`` finds any pair."""
    shown = "; ".join(f"{p['type']} with {p['with']} ({p['share']:.0%} of its cells' "
                      f"neighbours, {p['share_unintegrated']:.0%} before)" for p in pairs[:5])
    more = f" and {len(pairs) - 5} more" if len(pairs) > 5 else ""
    return (f"Cell types that the counts keep apart now lie on one another: {shown}{more}. "
            "This happens when types are (nearly) exclusive to different domains and the "
            "adversary aligns them. Check these types on the map; refit with "
            "--decoder-layers 1 (a decoder that can explain less of a type-specific batch "
            "effect) or a lower --adv-weight.")


def mixing_fraction(idx: np.ndarray, codes: np.ndarray, n_domains: int) -> float:
    """Median over cells of the kNN domain entropy, as a fraction of the entropy of the domains'
    overall shares (what random mixing gives): 1 when neighbourhoods are as diverse as the
    domains' sizes allow, whatever those sizes; the median passes over cell types that exist in
    one domain only, which should not mix."""
    if n_domains < 2:
        return float("nan")
    shares = domain_shares(codes, n_domains)
    shares = shares[shares > 0]
    random_mixing = -(shares * np.log(shares)).sum() / np.log(n_domains)
    per_cell = knn_domain_entropy(idx, codes, n_domains, per_cell=True)
    return float(min(np.median(per_cell) / random_mixing, 1.0))


def lisi(dist: np.ndarray, idx: np.ndarray, labels: np.ndarray, perplexity: float = 30.0,
         ) -> np.ndarray:
    """Local inverse Simpson's index per cell (Harmony's compute_lisi): Gaussian kernel weights on
    the neighbours, each cell's bandwidth calibrated to the perplexity by bisection."""
    n, k = dist.shape
    d2 = dist.astype(np.float64) ** 2
    target = np.log(min(perplexity, k - 1e-9))
    beta = np.ones(n)
    lo, hi = np.zeros(n), np.full(n, np.inf)
    for _ in range(50):
        w = np.exp(-(d2 - d2[:, :1]) * beta[:, None])
        wsum = w.sum(axis=1)
        p = w / wsum[:, None]
        entropy = np.log(wsum) + beta * (d2 * p).sum(axis=1) - beta * d2[:, 0]
        too_flat = entropy > target  # entropy too high -> sharpen (raise beta)
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
    codes = np.unique(labels, return_inverse=True)[1]
    simpson = np.zeros(n)
    for c in range(codes.max() + 1):
        share = (p * (codes[idx] == c)).sum(axis=1)
        simpson += share ** 2
    return 1.0 / simpson


def batch_asw(embedding: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> float:
    """scIB's batch ASW: per cell type, 1 - |silhouette of the batch labels|, averaged per type
    and then over types (types present in one batch only are skipped)."""
    from sklearn.metrics import silhouette_samples

    scores = []
    for label in np.unique(labels):
        cells = labels == label
        if len(np.unique(batch[cells])) < 2 or cells.sum() < 3:
            continue
        sil = silhouette_samples(embedding[cells], batch[cells])
        scores.append(np.mean(1.0 - np.abs(sil)))
    return float(np.mean(scores)) if scores else float("nan")


def integration_metrics(embedding: np.ndarray, batch: np.ndarray, labels: np.ndarray | None,
                        seed: int = 0, max_cells: int = 20000) -> dict[str, Any]:
    """iLISI (overall, and each domain's median: ``ilisi_by_domain``) and cLISI
    (scIB-normalised), batch and label ASW, ARI and NMI of k-means clusters, kNN batch entropy,
    and the scIB-style bio / batch / overall (0.6 bio + 0.4 batch) scores.

    Above ``max_cells`` cells a seeded subsample is scored (silhouettes are quadratic)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    embedding = np.asarray(embedding, dtype=np.float64)
    batch = np.asarray(batch).astype(str)
    if embedding.shape[0] > max_cells:
        keep = np.random.default_rng(seed).choice(embedding.shape[0], max_cells, replace=False)
        embedding, batch = embedding[keep], batch[keep]
        labels = None if labels is None else np.asarray(labels)[keep]
    n_batches = len(np.unique(batch))
    dist, idx = knn(embedding, 90)
    out: dict[str, Any] = {}
    ilisi_per_cell = lisi(dist, idx, batch)
    ilisi = np.median(ilisi_per_cell)
    out["ilisi"] = float((ilisi - 1.0) / (n_batches - 1.0)) if n_batches > 1 else float("nan")
    out["ilisi_by_domain"] = ilisi_by_domain(ilisi_per_cell, batch)
    batch_codes = np.unique(batch, return_inverse=True)[1]
    out["ilisi_random_mixing"] = random_mixing_ilisi(batch_codes, n_batches)
    out["knn_batch_entropy"] = knn_domain_entropy(idx[:, :50], batch_codes, n_batches)
    out["mixing_fraction"] = mixing_fraction(idx[:, :50], batch_codes, n_batches)
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        n_labels = len(np.unique(labels))
        clisi = np.median(lisi(dist, idx, labels))
        out["clisi"] = float((n_labels - clisi) / (n_labels - 1.0)) if n_labels > 1 else float("nan")
        out["batch_asw"] = batch_asw(embedding, batch, labels)
        out["label_asw"] = float((silhouette_score(embedding, labels) + 1.0) / 2.0)
        clusters = KMeans(n_clusters=n_labels, n_init=10, random_state=seed).fit_predict(embedding)
        out["ari"] = float(adjusted_rand_score(labels, clusters))
        out["nmi"] = float(normalized_mutual_info_score(labels, clusters))
        out["bio_score"] = float(np.mean([out["nmi"], out["ari"], out["label_asw"], out["clisi"]]))
        out["batch_score"] = float(np.mean([out["batch_asw"], out["ilisi"]]))
        out["overall_score"] = 0.6 * out["bio_score"] + 0.4 * out["batch_score"]
    return out
