"""Reading and validating AnnData inputs: every command goes through here.

Checks follow the data contract (docs/data_format.md): a readable .h5ad, keys that exist (the message lists those that do), raw
counts that are finite, non-negative whole numbers, at least one cell and one gene, unique gene
names, a binary treatment, a batch key with two or more domains, covariates that encode cleanly.
Counts are checked in row blocks so a backed (on-disk) file is never loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import keys
from .backed import (BLOCK_ROWS, BackedAnnData, BackedCountRows, CountTally,
                     check_count_block, iter_row_blocks, pair_keys)
from .errors import InputError

def read_h5ad(path: str | Path, backed: bool | str = False):
    """Open an .h5ad file, turning every way of failing into an InputError that names the file.
    ``backed``: a BackedAnnData, X and the layers left on disk (True or "r": read-only, "r+":
    writable)."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise InputError(f"Input file '{path}' does not exist.")
    if path.is_dir():
        raise InputError(f"Input '{path}' is a folder; an .h5ad file was expected.")
    try:
        if backed:
            return BackedAnnData(path, "r" if backed is True else backed)
        return ad.read_h5ad(path)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(
            f"'{path}' is not a readable .h5ad file ({first}). advcli reads AnnData files "
            "written by anndata or scanpy.") from None


def read_backed(path, mode: str = "r") -> BackedAnnData:
    """An .h5ad with its counts and layers left on disk, for ``IntegrationModel``,
    ``ConfounderModel`` and ``predict`` on files larger than memory (mode "r+" to write
    predictions into it)."""
    return read_h5ad(path, mode)


def _missing_key(what: str, key: str, existing: Sequence[str], hint: str = "") -> InputError:
    shown = ", ".join(repr(k) for k in list(existing)[:30]) or "none"
    more = f" (and {len(existing) - 30} more)" if len(existing) > 30 else ""
    return InputError(f"{what} '{key}' not found. The file has: {shown}{more}.{hint}")


RAW = "raw"


def counts_anndata(adata, layer: str | None):
    """The AnnData whose genes and counts advcli reads. ``--layer raw`` means ``adata.raw`` (its
    own genes, often more than X's) unless the file has a layer named 'raw'; the result then
    holds those counts as layers['raw'] beside the same obs."""
    if layer != RAW or RAW in adata.layers:
        return adata
    if getattr(adata, "isbacked", False):
        raise InputError("--layer raw with --backed: anndata cannot leave adata.raw on disk. "
                         "Store the counts as a layer (layers['raw'] or X) or drop --backed.")
    if adata.raw is None:
        raise InputError("--layer raw: the file has neither adata.raw nor layers['raw']. "
                         f"Its layers: {', '.join(map(repr, adata.layers.keys())) or 'none'}.")
    import anndata as ad

    return ad.AnnData(obs=adata.obs, var=adata.raw.var.copy(), layers={RAW: adata.raw.X})


def count_source(adata, layer: str | None):
    """The matrix holding raw counts: X, or layers[layer]."""
    if layer is None:
        if adata.X is None:
            raise InputError("The file has no X matrix; give the counts' layer with --layer.")
        return adata.X
    if layer not in adata.layers:
        raise _missing_key("Layer", layer, list(adata.layers.keys()))
    return adata.layers[layer]


def check_finite_obsm(adata, key: str, what: str) -> np.ndarray:
    """``obsm[key]`` as float64, refusing NaN or infinite entries (a diverged fit's output)."""
    values = np.asarray(adata.obsm[key], dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(f"obsm['{key}'] ({what}) holds {int(bad.sum())} NaN or infinite "
                         "values: the model that wrote it diverged, or the file was edited. "
                         "Refit, then predict again.")
    return values


def validate_counts(adata, layer: str | None = None, name: str = "input") -> None:
    """Raise InputError unless the counts are a non-empty matrix of finite non-negative integers."""
    matrix = checked_count_source(adata, layer, name)
    where = f"layers['{layer}']" if layer else "X"
    for start, part in iter_row_blocks(matrix):
        check_count_block(part, start, where)
    check_gene_names(adata)


def checked_count_source(adata, layer: str | None, name: str = "input"):
    """The counts matrix, refused when it is empty or not numeric (its values are checked per
    row block by ``check_count_block``)."""
    matrix = count_source(adata, layer)
    where = f"layers['{layer}']" if layer else "X"
    n_cells, n_genes = matrix.shape
    if n_cells == 0 or n_genes == 0:
        raise InputError(f"The {name} file has {n_cells} cells and {n_genes} genes; advcli needs "
                         "at least one of each.")
    dtype = np.dtype(matrix.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise InputError(f"{where} has dtype {dtype}; raw counts must be numbers.")
    return matrix


def check_gene_names(adata) -> None:
    names = pd.Index(adata.var_names)
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InputError(f"Gene names (var_names) are not unique, e.g. {dup}; make them unique "
                         "(AnnData.var_names_make_unique()).")


def load_counts(adata, layer: str | None = None) -> sp.csr_matrix:
    """Counts as an in-memory float32 CSR matrix (validated beforehand by ``validate_counts``)."""
    matrix = count_source(adata, layer)
    blocks = [sp.csr_matrix(part, dtype=np.float32) for _, part in iter_row_blocks(matrix)]
    return sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]


def library_sizes(counts) -> np.ndarray:
    """Total counts per cell (float64); counts on disk (BackedCountRows) know theirs."""
    if getattr(counts, "backed", False):
        return counts.library
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def size_factors(adata, counts, how: str) -> np.ndarray:
    """Per-cell size factors (positive, not yet centred): ``none`` (all 1), ``library`` (total
    counts) or the name of a numeric obs column (e.g. size factors from scran or DESeq2)."""
    if how == "none":
        return np.ones(counts.shape[0])
    if how == "library":
        values = library_sizes(counts)
        if (values <= 0).any():
            raise InputError(f"{int((values <= 0).sum())} cells have no counts at all, so their "
                             "library size is 0. Remove empty cells (e.g. scanpy's "
                             "pp.filter_cells(min_counts=1)) or give --size-factors none.")
        return values
    col = obs_column(adata, how, "Size-factor")
    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise InputError(f"--size-factors obs['{how}'] must be a finite, positive number for "
                         "every cell (or give 'library' or 'none').")
    return values


def gene_moments(counts: sp.csr_matrix, sf: np.ndarray, sums: tuple | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: log of the mean normalised count and a moment estimate of the NB dispersion,
    sum((y - m s)^2 - m s) / sum((m s)^2) with m = sum(y) / sum(s), clipped to [1e-3, 20].
    ``sums``: (sum y, sum y^2, sum y s) per gene, accumulated elsewhere (a streaming pass)."""
    total_s = sf.sum()
    if sums is None:
        sums = (np.asarray(counts.sum(axis=0)).ravel(),
                np.asarray(counts.multiply(counts).sum(axis=0)).ravel(),
                np.asarray(counts.T @ sf).ravel())
    m = sums[0] / total_s
    sq, ys = sums[1], sums[2]
    s2 = float((sf ** 2).sum())
    num = sq - 2.0 * m * ys + m ** 2 * s2 - m * total_s
    alpha = np.clip(num / np.maximum(m ** 2 * s2, 1e-12), 1e-3, 20.0)
    return np.log(np.maximum(m, 1e-8)), alpha


MAX_FACTORS = 10


def residual_factors(log_y: sp.csr_matrix, y_mean: np.ndarray, y_sd: np.ndarray,
                     design: np.ndarray, k: int, seed: int,
                     max_cells: int = 20_000) -> np.ndarray:
    """Scores of the top-k principal components of the standardised log counts after regressing
    out [1, X, D] (an SVA-like start for Z), for every cell, standardised per column.

    These are axes of the generator's own inputs (standardised log counts), so it can learn to
    output them. Loadings come from at most ``max_cells`` cells; every cell is then scored in
    row blocks, so memory stays bounded on large data.
    """
    n = log_y.shape[0]
    rng = np.random.default_rng(seed)
    design = np.column_stack([np.ones(n), design]).astype(np.float64)

    def standardised(rows) -> np.ndarray:
        block = log_y[rows]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        return np.clip((block - y_mean) / y_sd, -10.0, 10.0)

    sub = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    y_sub = standardised(sub)
    coef, *_ = np.linalg.lstsq(design[sub], y_sub, rcond=None)
    resid = y_sub - design[sub] @ coef
    from sklearn.utils.extmath import randomized_svd

    k_eff = min(k, min(resid.shape) - 1) if min(resid.shape) > 1 else 0
    if k_eff < 1:
        return np.zeros((n, k), dtype=np.float32)
    _, _, vt = randomized_svd(resid, k_eff, random_state=seed)
    scores = np.zeros((n, k))
    for start in range(0, n, BLOCK_ROWS):
        rows = np.arange(start, min(start + BLOCK_ROWS, n))
        scores[rows, :k_eff] = (standardised(rows) - design[rows] @ coef) @ vt.T
    sd = scores.std(axis=0)
    scores = np.where(sd > 0, (scores - scores.mean(axis=0)) / np.where(sd > 0, sd, 1.0), 0.0)
    return scores.astype(np.float32)


PEARSON_OVERDISPERSION = 0.01  # theta = 100, as analytic Pearson residuals (Lause et al. 2021)
GLM_CELLS = 5_000  # cells that fit the count GLM behind the residuals (its elementwise passes cost)


def factor_count(counts, offset: np.ndarray, design: np.ndarray, seed: int,
                 max_cells: int = 20_000) -> int:
    """How many hidden factors the counts hold beyond [1, X, D]: parallel analysis
    (``count_factors``) on the Pearson residuals of a count GLM (log link, the cell's log size
    factor as offset).

    Pearson residuals, not log1p counts: a gene with no structure beyond [X, D] then has
    residual variance about 1 whatever its mean or the cell's depth. On log1p counts it does not
    (log1p is not additive on the log scale, and sparse genes' noise follows depth), and with
    1,000 or more genes that showed as 3-8 components where a simulation had one hidden
    factor. The residuals are clipped at +-sqrt(cells / 30) (sctransform's bound), so a few
    extreme counts of sparse genes do not set the noise level. ``counts``: CSR, or rows on disk
    (BackedCountRows); at most ``max_cells`` cells are read, and GLM_CELLS of them fit the GLM.
    """
    from .effects import nb_glm

    n, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    y = counts.read(sub) if getattr(counts, "backed", False) else counts[sub]
    y = sp.csr_matrix(y, dtype=np.float64)
    design = np.column_stack([np.ones(len(sub)), design[sub]]).astype(np.float64)
    offset = np.asarray(offset, dtype=np.float64)[sub]
    alpha = np.full(n_genes, PEARSON_OVERDISPERSION)
    fit = (np.sort(rng.choice(len(sub), GLM_CELLS, replace=False)) if len(sub) > GLM_CELLS
           else np.arange(len(sub)))  # a few coefficients per gene: fewer cells fit them
    coef = nb_glm(y[fit], design[fit], offset[fit], alpha=alpha, max_iter=25, tol=1e-6)["coef"]
    present = np.isfinite(coef).all(axis=1)  # a gene absent from these cells has no residual
    coef = np.where(present[:, None], coef, 0.0)
    bound = max(float(np.sqrt(len(sub) / 30.0)), 1.0)
    y = y.tocsc()
    resid = np.empty((len(sub), n_genes), dtype=np.float32)
    for start in range(0, n_genes, 512):  # gene blocks: one float32 matrix, small temporaries
        cols = slice(start, min(start + 512, n_genes))
        mu = np.exp(np.clip(design @ coef[cols].T + offset[:, None], -30.0, 30.0))
        block = (y[:, cols].toarray() - mu) / np.sqrt(mu + PEARSON_OVERDISPERSION * mu * mu)
        resid[:, cols] = np.clip(block, -bound, bound)
    resid = resid[:, present]
    resid -= resid.mean(axis=0)
    return count_factors(resid, seed)


def count_factors(resid: np.ndarray, seed: int, permutations: int = 3) -> int:
    """Leading singular values of ``resid`` above the largest singular value of any of a few
    gene-wise permutations of it (structure beyond what noise of the same marginals shows).
    Against the largest, not the same-rank one (Horn's rule): a spurious column costs more than
    a missed weak one (it takes up part of the treatment contrast), and the same-rank rule
    admitted one on a 100-gene simulation of one factor."""
    from sklearn.utils.extmath import randomized_svd

    top = min(MAX_FACTORS, min(resid.shape) - 1)
    if top < 1:
        return 1
    rng = np.random.default_rng(seed)
    real = randomized_svd(resid, top, random_state=seed)[1]
    null = max(randomized_svd(np.column_stack([rng.permutation(col) for col in resid.T]), 1,
                              random_state=seed)[1][0] for _ in range(permutations))
    above = real > null
    return int(max(1, np.argmin(above) if not above.all() else top))


def obs_column(adata, key: str, what: str) -> pd.Series:
    return obs_column_of(adata.obs, key, what)


def obs_column_of(obs: pd.DataFrame, key: str, what: str = "Sample") -> pd.Series:
    if key not in obs.columns:
        raise _missing_key(f"{what} key", key, list(obs.columns))
    return obs[key]


def sample_labels(obs: pd.DataFrame, key: str) -> np.ndarray:
    """Each cell's sample (donor) for pseudobulk testing, as strings; no missing values."""
    col = obs_column_of(obs, key, "Sample")
    if col.isna().any():
        raise InputError(f"--sample-key obs['{key}'] has {int(col.isna().sum())} missing values.")
    return col.astype(str).to_numpy()


def encode_treatment(adata, key: str, treated_level: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Binary treatment D as float32 0/1 and the [control, treated] level names.

    0/1 numbers and booleans mean what they say; a two-level categorical or string column treats
    its second level (categorical order, else sorted) as D = 1. ``treated_level`` names the
    treated level for any of them (a model replays the levels it was fit with this way).
    """
    col = obs_column(adata, key, "Treatment")
    if col.isna().any():
        raise InputError(f"Treatment obs['{key}'] has {int(col.isna().sum())} missing values; "
                         "every cell needs a treatment.")
    if pd.api.types.is_bool_dtype(col):
        values, levels = col.to_numpy().astype(np.float32), ["False", "True"]
    elif pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype):
        values = col.to_numpy().astype(np.float64)
        uniq = np.unique(values)
        if not np.isin(uniq, [0.0, 1.0]).all():
            raise InputError(
                f"Treatment obs['{key}'] is numeric with values {uniq[:6].tolist()}; a binary "
                "treatment must be 0/1 (or a two-level category).")
        values, levels = values.astype(np.float32), ["0", "1"]
    else:
        if isinstance(col.dtype, pd.CategoricalDtype):
            levels = [str(c) for c in col.cat.categories if (col == c).any()]
        else:
            levels = sorted(str(v) for v in col.astype(str).unique())
        if len(levels) != 2:
            raise InputError(
                f"Treatment obs['{key}'] has {len(levels)} levels ({levels[:6]}); a binary "
                "treatment has exactly two.")
        values = (col.astype(str).to_numpy() == levels[1]).astype(np.float32)
    if treated_level is not None and treated_level != levels[1]:
        if treated_level != levels[0]:
            raise InputError(f"--treated-level '{treated_level}' is not a level of "
                             f"obs['{key}'] (levels: {levels}).")
        values, levels = 1.0 - values, levels[::-1]
    if values.min() == values.max():
        raise InputError(f"Treatment obs['{key}'] has only one value among the cells; both "
                         "treated and control cells are needed.")
    return values, levels


@dataclass
class CovariateEncoding:
    """How obs columns become the covariate matrix X: learnt at fit, replayed at predict.

    Numeric columns are used as they are; categorical (or string) columns are one-hot encoded
    against their first level, so a model with an intercept stays identifiable.
    """

    keys: list[str]
    kinds: list[str]
    levels: list[list[str]]

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for key, kind, lv in zip(self.keys, self.kinds, self.levels):
            cols += [key] if kind == "numeric" else [f"{key}={level}" for level in lv[1:]]
        return cols

    def to_dict(self) -> dict:
        return {"keys": list(self.keys), "kinds": list(self.kinds),
                "levels": [list(lv) for lv in self.levels]}

    @classmethod
    def from_dict(cls, d: dict) -> "CovariateEncoding":
        return cls(list(d["keys"]), list(d["kinds"]), [list(lv) for lv in d["levels"]])

    @classmethod
    def fit(cls, adata, covariate_keys: Sequence[str]) -> "CovariateEncoding":
        kinds, levels = [], []
        for key in covariate_keys:
            col = obs_column(adata, key, "Covariate")
            if pd.api.types.is_bool_dtype(col) or (pd.api.types.is_numeric_dtype(col)
                                                   and not isinstance(col.dtype, pd.CategoricalDtype)):
                kinds.append("numeric")
                levels.append([])
            else:
                if isinstance(col.dtype, pd.CategoricalDtype):
                    lv = [str(c) for c in col.cat.categories if (col == c).any()]
                else:
                    lv = sorted(str(v) for v in col.dropna().astype(str).unique())
                if len(lv) < 2:
                    raise InputError(f"Covariate obs['{key}'] has {len(lv)} level(s); a "
                                     "categorical covariate needs at least two.")
                kinds.append("categorical")
                levels.append(lv)
        return cls(list(covariate_keys), kinds, levels)

    def transform(self, adata) -> np.ndarray:
        n = adata.n_obs
        parts = [np.zeros((n, 0), dtype=np.float32)]
        for key, kind, lv in zip(self.keys, self.kinds, self.levels):
            col = obs_column(adata, key, "Covariate")
            if col.isna().any():
                raise InputError(f"Covariate obs['{key}'] has {int(col.isna().sum())} missing "
                                 "values.")
            if kind == "numeric":
                if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)) \
                        or isinstance(col.dtype, pd.CategoricalDtype):
                    raise InputError(f"Covariate obs['{key}'] was numeric when the model was fit "
                                     f"but is {col.dtype} here.")
                values = col.to_numpy().astype(np.float64)
                if not np.isfinite(values).all():
                    raise InputError(f"Covariate obs['{key}'] has NaN or infinite values.")
                parts.append(values.astype(np.float32)[:, None])
            else:
                as_str = col.astype(str).to_numpy()
                unknown = sorted(set(np.unique(as_str)) - set(lv))
                if unknown:
                    raise InputError(f"Covariate obs['{key}'] has levels {unknown[:5]} that the "
                                     f"model has not seen (known: {lv}).")
                parts.append(np.stack([(as_str == level) for level in lv[1:]], axis=1)
                             .astype(np.float32))
        return np.concatenate(parts, axis=1)


def set_uns(adata, name: str, value) -> None:
    """Set uns['advcli'][name], keeping whatever else uns['advcli'] holds."""
    adata.uns[keys.UNS] = {**dict(adata.uns.get(keys.UNS, {})), name: value}


def default_covariate_keys(adata) -> list[str]:
    """The covariate keys a simulator recorded in uns['advcli'], else none."""
    meta = adata.uns.get(keys.UNS, {})
    found = meta.get(keys.COVARIATE_KEYS) if isinstance(meta, dict) else None
    if found is None:
        return []
    if isinstance(found, str) or not isinstance(found, (list, tuple, np.ndarray)):
        raise InputError(f"uns['{keys.UNS}']['{keys.COVARIATE_KEYS}'] must be a list of obs "
                         f"columns (got {type(found).__name__}); pass --covariate-keys instead.")
    return [str(k) for k in found]


def parse_key_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    return [t for t in items if t]


MAX_DOMAINS = 200


def encode_domains(adata, key: str, domains: Sequence[str] | None = None,
                   what: str = "Batch") -> tuple[np.ndarray, list[str]]:
    """Codes (int64) for the levels of ``obs[key]`` (domains, classes, labels) and the level
    names, checking for two or more."""
    col = obs_column(adata, key, what)
    if col.isna().any():
        raise InputError(f"{what} obs['{key}'] has {int(col.isna().sum())} missing values.")
    if pd.api.types.is_float_dtype(col.dtype) and not np.all(np.mod(col.to_numpy(), 1) == 0):
        raise InputError(f"{what} obs['{key}'] holds non-integer numbers: it looks like a "
                         "measurement, not a label. Give the column naming each cell's "
                         f"{what.lower()}.")
    as_str = col.astype(str).to_numpy()
    if domains is None:
        if isinstance(col.dtype, pd.CategoricalDtype):
            domains = [str(c) for c in col.cat.categories if (col == c).any()]
        else:
            domains = sorted(np.unique(as_str).tolist())
        if len(domains) < 2:
            raise InputError(f"{what} obs['{key}'] has a single level ({domains}); advcli "
                             "needs two or more levels.")
        if len(domains) > MAX_DOMAINS:
            raise InputError(f"{what} obs['{key}'] has {len(domains)} levels; a label column "
                             f"has a few (at most {MAX_DOMAINS}). Is it the right column?")
    else:
        unknown = sorted(set(np.unique(as_str)) - set(domains))
        if unknown:
            raise InputError(f"{what} obs['{key}'] has levels {unknown[:5]} that the model was not "
                             f"trained on (known: {list(domains)}).")
    lookup = {d: i for i, d in enumerate(domains)}
    return np.array([lookup[s] for s in as_str], dtype=np.int64), list(domains)


def gene_order(adata, genes: Sequence[str]) -> np.ndarray:
    """Column indices that put the data's genes in the model's order; missing genes are an error."""
    index = pd.Index(adata.var_names)
    if not index.is_unique:
        raise InputError("Gene names (var_names) of the data are not unique.")
    missing = [g for g in genes if g not in index]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise InputError(f"The data lack {len(missing)} of the {len(genes)} genes the model "
                         f"was trained on: {shown}.")
    return index.get_indexer(list(genes))


class CountRows:
    """Counts for minibatches: a dense tensor when it fits comfortably, else CSR rows densified
    per batch (so 10^6 cells never need a dense copy). With ``histogram``, also the per-gene
    histogram of the counts (``count_histogram``) an NB loss can take its count term from."""

    DENSE_LIMIT = 200_000_000  # entries (800 MB as float32)
    backed = False

    def __init__(self, counts: sp.csr_matrix, device, histogram: bool = False):
        import torch
        from scipy.special import gammaln

        self.shape = counts.shape
        self.device = device
        self.col_sums = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
        csr = sp.csr_matrix(counts)  # zeros add log(0!) = 0: the sums need the stored entries only
        per_entry = sp.csr_matrix((gammaln(csr.data + 1.0), csr.indices, csr.indptr),
                                  shape=csr.shape)
        self.log_factorial = torch.from_numpy(
            np.asarray(per_entry.sum(axis=1), dtype=np.float64).ravel().astype(np.float32)).to(device)
        self.count_histogram, self._csr, self._pair_ids = None, csr, None
        if histogram:
            tally = CountTally(counts.shape[1])
            for start in range(0, csr.shape[0], BLOCK_ROWS):
                tally.add(csr[start:start + BLOCK_ROWS])
            self.count_histogram = tally.histogram(device)
        if counts.shape[0] * counts.shape[1] <= self.DENSE_LIMIT:
            self.dense = torch.from_numpy(counts.toarray()).to(device)
            self.csr = None
        else:
            self.dense, self.csr = None, counts

    def pair_ids(self, idx):
        """The ``count_histogram`` pair of every stored count of the cells ``idx``, flat (int64;
        the number of pairs for a stored zero), for CountHistogram.of_pairs."""
        import torch

        if self._pair_ids is None:  # built on first use: the models that never ask pay nothing
            self._pair_ids = entry_pair_ids(self._csr, self.count_histogram)
        found = self._pair_ids[idx.cpu().numpy()].data.astype(np.int64)
        return torch.from_numpy(found).to(self.device)

    def rows(self, idx):
        import torch

        if self.dense is not None:
            return self.dense[idx.to(self.dense.device)]
        return torch.from_numpy(self.csr[idx.cpu().numpy()].toarray()).to(self.device)


def entry_pair_ids(csr: sp.csr_matrix, histogram, chunk: int = 1 << 22) -> sp.csr_matrix:
    """A CSR matrix shaped like ``csr`` whose values are the ``histogram`` pair of each stored
    count (the number of pairs for a stored zero), computed ``chunk`` entries at a time."""
    keys = pair_keys(histogram.genes.cpu().numpy(), histogram.counts.cpu().numpy())
    order = np.argsort(keys)
    ids = np.empty(csr.nnz, dtype=np.int32)
    for start in range(0, csr.nnz, chunk):
        values = csr.data[start:start + chunk].astype(np.int64)
        entries = pair_keys(csr.indices[start:start + chunk], values)
        at = np.minimum(np.searchsorted(keys, entries, sorter=order), len(keys) - 1)
        ids[start:start + chunk] = np.where(values > 0, order[at], len(keys))
    return sp.csr_matrix((ids, csr.indices, csr.indptr), shape=csr.shape)


def count_rows(adata, layer: str | None, device, columns: np.ndarray | None = None,
               name: str = "input", histogram: bool = False):
    """Validated counts for minibatches, genes ``columns`` (all when None): in memory
    (CountRows), or left on disk when ``adata`` is backed (``--backed``: BackedCountRows, read
    in row blocks). Both carry ``col_sums``, the counts per gene."""
    if getattr(adata, "isbacked", False):  # the values are checked in its streaming pass
        matrix = checked_count_source(adata, layer, name)
        check_gene_names(adata)
        return BackedCountRows(matrix, device, columns, f"layers['{layer}']" if layer else "X",
                               histogram)
    validate_counts(adata, layer, name)
    counts = load_counts(adata, layer)
    return CountRows(counts if columns is None else counts[:, columns], device, histogram)


def seeded_subset(n: int, most: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``most`` of ``n`` items (all of them when n <= most):
    the sample that metrics, plots and per-epoch statistics read on large data."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, most), replace=False))


def minibatches(n: int, batch_size: int, generator, shuffle: bool = True) -> list:
    """Index tensors of one pass over ``n`` cells, in a seeded random order (no Dataset objects)."""
    import torch

    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


TARGET_SUM = 1e4  # counts are normalised to this library size before log1p


def count_batch(rows: "CountRows", idx) -> dict:
    """Counts of the cells ``idx``, their library sizes and log1p(counts / library x 1e4): what
    every count autoencoder's encoder reads and its NB reconstruction needs."""
    import torch

    counts = rows.rows(idx)
    library = counts.sum(dim=1).clamp_min(1.0)
    return {"counts": counts, "library": library,
            "log_factorial": rows.log_factorial[idx.to(rows.log_factorial.device)],
            "x_norm": log_normalised(counts, library)}


def log_normalised(counts: "torch.Tensor", library: "torch.Tensor | None" = None
                   ) -> "torch.Tensor":
    """log1p(counts / library x 1e4), each row by its own library size (its total when None)."""
    import torch

    if library is None:
        library = counts.sum(dim=1).clamp_min(1.0)
    return torch.log1p(counts / library[:, None] * TARGET_SUM)


COVARIANCE_GENES = 4096  # up to this many genes the PCs come from the exact covariance; above,
                         # from a randomised SVD of at most PCA_CELLS cells (a 15,000-gene
                         # covariance would take 1.8 GB and minutes to decompose)
PCA_CELLS = 10_000


def expression_pcs(rows: "CountRows", n_pcs: int, genes=None, block: int = 4096):
    """The mean and the first ``n_pcs`` principal axes (genes x n_pcs) of log1p-normalised
    expression (of the columns ``genes``; all when None). Up to COVARIANCE_GENES genes the
    covariance is accumulated in float64 over row blocks (every cell counts, no dense copy).
    The axes are scaled so that the first component has unit variance (the others keep their
    share) and signed so that each axis's largest loading is positive."""
    import torch

    def expression(idx):
        x = count_batch(rows, idx)["x_norm"]
        return (x if genes is None else x[:, genes]).cpu().double()

    n = rows.shape[0]
    n_genes = rows.shape[1] if genes is None else len(genes)
    if n_genes <= COVARIANCE_GENES:
        total, outer = torch.zeros(n_genes, dtype=torch.float64), 0.0
        for start in range(0, n, block):
            x = expression(torch.arange(start, min(start + block, n)))
            total, outer = total + x.sum(0), outer + x.T @ x
        mean = total / n
        values, vectors = torch.linalg.eigh((outer - n * torch.outer(mean, mean)) / max(n - 1, 1))
        values, vectors = values.flip(0)[:n_pcs], vectors.flip(1)[:, :n_pcs]  # descending
    else:
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:PCA_CELLS]
        x = expression(chosen.sort().values)
        mean = x.mean(0)
        _, singular, vectors = torch.svd_lowrank(x - mean, q=min(n_pcs + 10, *x.shape), niter=6)
        values = (singular ** 2 / max(len(x) - 1, 1))[:n_pcs]
        vectors = vectors[:, :n_pcs]
    biggest = vectors.abs().argmax(dim=0)
    vectors = vectors * torch.sign(vectors[biggest, torch.arange(vectors.shape[1])])
    return mean.float(), (vectors / values[0].clamp_min(1e-12).sqrt()).float()


def stratified_minibatches(groups: list, batch_size: int, generator) -> list:
    """One epoch over the cells of ``groups`` (index tensors, e.g. one per domain), each cell
    once, every minibatch holding the groups in their overall proportions: each group is
    shuffled and its cells spread evenly over the epoch, so the composition does not vary from
    one minibatch to the next as a plain shuffle's would."""
    import torch

    cells, position = [], []
    for g in groups:
        n = len(g)
        if n:
            cells.append(g[torch.randperm(n, generator=generator)])
            offset = torch.rand(1, generator=generator, dtype=torch.float64)
            position.append((torch.arange(n, dtype=torch.float64) + offset) / n)
    cells, position = torch.cat(cells), torch.cat(position)
    return list(cells[torch.argsort(position, stable=True)].split(batch_size))


MAX_VAL_CELLS = 10_000  # held-out cells estimate the validation loss well long before 10%
                        # of an atlas; more would only slow every epoch


MIN_DOMAIN_CELLS = 10  # the discriminator needs a few training cells of every domain


def stratified_split(domain: np.ndarray, names: Sequence[str], val_fraction: float, seed: int,
                     key: str):
    """Seeded, domain-stratified train / validation split: (training cells per domain,
    validation cells). ``val_fraction`` of the cells are held out, at most MAX_VAL_CELLS."""
    import torch

    rng = np.random.default_rng(seed)
    share = val_fraction * min(1.0, MAX_VAL_CELLS / max(val_fraction * len(domain), 1.0))
    train, val = [], []
    for k, name in enumerate(names):
        cells = rng.permutation(np.flatnonzero(domain == k))
        n_val = int(round(share * len(cells)))
        if len(cells) - n_val < MIN_DOMAIN_CELLS:
            raise InputError(
                f"Domain '{name}' of obs['{key}'] has {len(cells)} cells, too few to learn it "
                f"from (at least {MIN_DOMAIN_CELLS} training cells per domain). Leave this "
                "domain out or merge it with a similar one.")
        train.append(torch.from_numpy(cells[n_val:]))
        val.append(cells[:n_val])
    return train, torch.from_numpy(np.sort(np.concatenate(val)))


def in_file_order(adata, genes: Sequence[str], values: np.ndarray) -> np.ndarray:
    """Per-gene outputs in the model's gene order, placed at the file's columns: genes the
    model does not know are NaN, and model genes the file's X lacks (read from .raw) are left
    out."""
    index = pd.Index(adata.var_names)
    if not index.is_unique:
        raise InputError("Gene names (var_names) of X are not unique, so per-gene outputs "
                         "cannot be placed; make them unique (AnnData.var_names_make_unique()).")
    full = np.full((values.shape[0], adata.n_vars), np.nan, dtype=np.float32)
    where = index.get_indexer(list(genes))
    present = where >= 0
    full[:, where[present]] = values[:, present]
    return full


def per_cell_frame(adata, written: list[str]) -> pd.DataFrame:
    """One row per cell: every per-cell column that predict wrote (obs columns and obsm
    matrices)."""
    frame = pd.DataFrame(index=adata.obs_names)
    for key in written:
        if key.startswith("obs['"):
            name = key[5:-2]
            frame[name] = adata.obs[name].to_numpy()
        elif key.startswith("obsm['"):
            name = key[6:-2]
            values = np.asarray(adata.obsm[name])
            for j in range(values.shape[1]):
                frame[f"{name}_{j}"] = values[:, j]
    return frame


def _local_quadratic(x: np.ndarray, y: np.ndarray, span: float = 0.3, grid: int = 200
                     ) -> np.ndarray:
    """A loess curve (degree 2, tricube weights over the nearest ``span`` of the points) of y
    on x, evaluated on a grid of x and interpolated to every point."""
    n = len(x)
    k = max(int(np.ceil(span * n)), 3)
    at = np.quantile(x, np.linspace(0, 1, grid))
    fitted = np.empty(grid)
    for i, x0 in enumerate(at):
        d = np.abs(x - x0)
        near = np.argpartition(d, k - 1)[:k]
        w = (1 - (d[near] / max(d[near].max(), 1e-12)) ** 3) ** 3
        design = np.column_stack([np.ones(k), x[near] - x0, (x[near] - x0) ** 2])
        sw = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq(design * sw, y[near] * sw[:, 0], rcond=None)[0]
        fitted[i] = coef[0]
    at, first = np.unique(at, return_index=True)
    return np.interp(x, at, fitted[first])


def highly_variable_genes(matrix, n_top: int, batches: np.ndarray | None = None) -> np.ndarray:
    """Column indices of the ``n_top`` most variable genes, in file order: the Seurat v3 rule on
    raw counts (each gene's variance after standardising by the loess trend of variance on mean,
    values clipped at mean + sqrt(cells) trend-SDs), ranked within each batch; genes variable in
    more batches first, then by median rank. Two passes over row blocks, so ``matrix`` may be
    a backed file's."""
    n_genes = matrix.shape[1]
    if n_top >= n_genes:
        return np.arange(n_genes)
    groups = np.zeros(matrix.shape[0], dtype=int) if batches is None else \
        np.unique(np.asarray(batches).astype(str), return_inverse=True)[1]
    n_groups = int(groups.max()) + 1
    size = np.bincount(groups, minlength=n_groups).astype(np.float64)

    def per_group_sums(clip: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        sums, squares = np.zeros((n_groups, n_genes)), np.zeros((n_groups, n_genes))
        for start, part in iter_row_blocks(matrix):
            part = sp.csr_matrix(part, dtype=np.float64)
            block_groups = groups[start:start + part.shape[0]]
            for b in np.unique(block_groups):
                sub = part[block_groups == b]
                data = sub.data if clip is None else np.minimum(sub.data, clip[b][sub.indices])
                sums[b] += np.bincount(sub.indices, weights=data, minlength=n_genes)
                squares[b] += np.bincount(sub.indices, weights=data ** 2, minlength=n_genes)
        return sums, squares

    sums, squares = per_group_sums(None)
    mean = sums / size[:, None]
    var = (squares / size[:, None] - mean ** 2) * (size / np.maximum(size - 1, 1))[:, None]
    sd, clip = np.zeros((n_groups, n_genes)), np.full((n_groups, n_genes), np.inf)
    fitted = np.zeros(n_groups, dtype=bool)
    for b in range(n_groups):
        varying = var[b] > 0
        if varying.sum() >= 3 and size[b] > 1:
            trend = _local_quadratic(np.log10(mean[b, varying]), np.log10(var[b, varying]))
            sd[b, varying] = np.sqrt(10 ** trend)
            clip[b] = mean[b] + sd[b] * np.sqrt(size[b])
            fitted[b] = True
    sums, squares = per_group_sums(clip)
    ranks, in_top = [], np.zeros(n_genes)
    for b in range(n_groups):
        norm_var = np.zeros(n_genes)
        if fitted[b]:
            n, m = size[b], mean[b]
            with np.errstate(divide="ignore", invalid="ignore"):
                norm_var = np.where(var[b] > 0, (n * m ** 2 + squares[b] - 2 * m * sums[b])
                                    / ((n - 1) * sd[b] ** 2), 0.0)
        order = np.argsort(-norm_var, kind="stable")
        rank = np.empty(n_genes)
        rank[order] = np.arange(n_genes)
        ranks.append(rank)
        in_top[order[:n_top]] += 1
    median_rank = np.median(np.vstack(ranks), axis=0)
    chosen = np.lexsort((median_rank, -in_top))[:n_top]
    return np.sort(chosen)
