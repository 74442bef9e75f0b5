"""Counts read in row blocks: the checks of every input, and ``--backed``, where the counts stay
on disk.

A file cannot serve scattered cells quickly, so an epoch is planned in buffers: the rows are cut
into chunks of CHUNK_ROWS, the chunks are shuffled and dealt into buffers of BUFFER_ROWS rows,
and the model draws its minibatches inside each buffer (block-level shuffling plus a shuffle
buffer). While one buffer trains, a background thread reads the next. Held-out cells are read
once and kept in memory. Per-gene and per-cell statistics come from one streaming pass, so
memory is bounded by a few buffers, not by the number of cells.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from .errors import InputError

BLOCK_ROWS = 16384  # rows per block of a streaming pass
CHUNK_ROWS = 512
BUFFER_ROWS = 32_768


def iter_row_blocks(matrix, block: int = BLOCK_ROWS) -> Iterator[tuple[int, Any]]:
    """Yield (start, block) row slices as dense ndarray or CSR, for in-memory or backed matrices."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        part = matrix[start:min(start + block, n)]
        if sp.issparse(part):
            part = sp.csr_matrix(part)
        else:
            part = np.asarray(part)
        yield start, part


def check_count_block(part, start: int, where: str) -> None:
    """Refuse NaN, infinite, non-integer or negative values in one row block of counts."""
    values = np.asarray(part.data if sp.issparse(part) else part)
    if values.size == 0:
        return
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise InputError(f"{where} contains NaN or infinite values (first in row "
                             f"{start + _first_row(part, bad)}); raw counts must be finite.")
        if (values != np.round(values)).any():
            raise InputError(
                f"{where} contains non-integer values (e.g. {values[values != np.round(values)][0]:g}); "
                "advcli models raw counts. If X holds normalised data, point --layer at the "
                "raw counts.")
    if (values < 0).any():
        raise InputError(f"{where} contains negative values (e.g. {values[values < 0][0]:g}); "
                         "raw counts are non-negative.")


def _first_row(part, bad_mask) -> int:
    if sp.issparse(part):
        pos = int(np.flatnonzero(bad_mask)[0])
        return int(np.searchsorted(part.indptr, pos, side="right") - 1)
    return int(np.argwhere(bad_mask)[0][0])


SPAN_ENTRIES = 1 << 22  # a scattered read fetches at most this many stored values at once


def read_rows(matrix, rows: np.ndarray):
    """The sorted, distinct ``rows`` of a matrix (CSR or dense; on disk or in memory). On disk,
    nearby rows are fetched together in spans of at most SPAN_ENTRIES stored values, so memory
    follows what is asked for: anndata's fancy row indexing of an on-disk CSR reads the whole
    span between the first and the last row (4.4 GB for 20,000 random rows of a 10^6-cell
    file)."""
    rows = np.asarray(rows, dtype=np.int64)
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray):
        return matrix[rows]
    if isinstance(matrix, _Columns):
        return read_rows(matrix.matrix, rows)[:, matrix.columns]
    if getattr(matrix, "format", None) != "csr":  # a dense HDF5 array reads rows by selection
        return np.asarray(matrix[rows]) if len(rows) else np.zeros((0, matrix.shape[1]))
    group = matrix.group
    indptr = group["indptr"]
    starts = np.asarray(indptr[rows], dtype=np.int64) if len(rows) else np.zeros(0, np.int64)
    ends = np.asarray(indptr[rows + 1], dtype=np.int64) if len(rows) else starts
    lengths = ends - starts
    data, indices = [], []
    i = 0
    while i < len(rows):  # one span (one read) per iteration, not one row
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + SPAN_ENTRIES, side="right")))
        lo, hi = starts[i], ends[j - 1]
        values, columns = group["data"][lo:hi], group["indices"][lo:hi]
        # positions of the asked rows' entries inside the span
        span_lengths = lengths[i:j]
        before = np.concatenate([[0], np.cumsum(span_lengths)[:-1]])
        keep = np.arange(span_lengths.sum()) + np.repeat(starts[i:j] - lo - before,
                                                         span_lengths)
        data.append(values[keep])
        indices.append(columns[keep])
        i = j
    return sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                          np.concatenate(indices) if indices else np.zeros(0, np.int32),
                          np.concatenate([[0], np.cumsum(lengths)])),
                         shape=(len(rows), matrix.shape[1]))


SMALL_COUNT = 64  # counts below this are tallied in a table; larger (rarer) ones are sorted
LARGE_SHIFT = 40  # a (gene, count) pair's key: gene << LARGE_SHIFT | count


def pair_keys(genes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(gene, count) pairs as sortable int64 keys, ordered by gene, then count."""
    return np.asarray(genes).astype(np.int64) << LARGE_SHIFT | np.asarray(counts).astype(np.int64)


class CountTally:
    """The per-gene histogram of nonzero counts (losses.CountHistogram), gathered block by
    block in a streaming pass: a table for small counts (no sort), sorted keys for the rest."""

    def __init__(self, n_genes: int):
        self.n_genes, self.cells = n_genes, 0
        self.small = np.zeros(n_genes * SMALL_COUNT, dtype=np.int64)
        self.large_keys = np.zeros(0, dtype=np.int64)
        self.large_n = np.zeros(0, dtype=np.int64)

    def add(self, csr: sp.csr_matrix) -> None:
        self.cells += csr.shape[0]
        values = csr.data.astype(np.int64)  # stored zeros land in column 0, dropped at the end
        small = values < SMALL_COUNT
        if small.all():
            keys = csr.indices * SMALL_COUNT + values
        else:
            keys = csr.indices[small] * SMALL_COUNT + values[small]
            large = ~small
            merged = np.concatenate([self.large_keys,
                                     pair_keys(csr.indices[large], values[large])])
            n = np.concatenate([self.large_n, np.ones(int(large.sum()), dtype=np.int64)])
            self.large_keys, inverse = np.unique(merged, return_inverse=True)
            self.large_n = np.bincount(inverse, weights=n).astype(np.int64)
        self.small += np.bincount(keys, minlength=self.small.size)

    def histogram(self, device):
        import torch

        from .losses import CountHistogram

        at = np.flatnonzero(self.small)
        at = at[at % SMALL_COUNT > 0]
        genes = np.concatenate([at // SMALL_COUNT, self.large_keys >> LARGE_SHIFT])
        counts = np.concatenate([at % SMALL_COUNT, self.large_keys & ((1 << LARGE_SHIFT) - 1)])
        share = np.concatenate([self.small[at], self.large_n]) / max(self.cells, 1)
        nonzero_share = np.bincount(genes, weights=share, minlength=self.n_genes)
        return CountHistogram(torch.from_numpy(genes),
                              torch.from_numpy(counts.astype(np.float32)),
                              torch.from_numpy(share.astype(np.float32)),
                              torch.from_numpy(nonzero_share.astype(np.float32))).to(device)


def check_backed_matrix(matrix, where: str) -> None:
    """Row blocks of a CSC matrix cost a pass over the whole file each: refuse it up front."""
    if getattr(matrix, "format", None) == "csc":
        raise InputError(f"{where} is stored as CSC (column-compressed), which cannot be read by "
                         "rows from disk. Rewrite it as CSR (e.g. adata.X = adata.X.tocsr(); "
                         "adata.write_h5ad(...)) or drop --backed.")


def _as_csr(part) -> sp.csr_matrix:
    return sp.csr_matrix(part) if sp.issparse(part) else sp.csr_matrix(np.asarray(part))


class _Buffer:
    """Some rows of the matrix (sorted) and their counts, in that order."""

    def __init__(self, rows: np.ndarray, csr: sp.csr_matrix):
        self.rows, self.csr = rows, csr

    def take(self, idx: np.ndarray) -> sp.csr_matrix | None:
        """The counts of ``idx`` when every one of them is here, else None."""
        if len(self.rows) == 0:
            return None
        pos = np.searchsorted(self.rows, idx)
        if (pos >= len(self.rows)).any():
            return None
        if (self.rows[pos] != idx).any():
            return None
        return self.csr[pos]


class BackedCountRows:
    """The CountRows interface (``shape``, ``log_factorial``, ``count_histogram``,
    ``rows(idx)``) over a matrix on disk, with ``columns`` selecting and ordering genes."""

    backed = True

    def __init__(self, matrix, device, columns: np.ndarray | None = None, where: str = "X",
                 histogram: bool = False):
        import torch
        from scipy.special import gammaln

        check_backed_matrix(matrix, where)
        self.matrix, self.columns, self.device = matrix, columns, device
        n = matrix.shape[0]
        g = matrix.shape[1] if columns is None else len(columns)
        self.shape = (n, g)
        log_factorial = np.zeros(n, dtype=np.float64)
        self.library = np.zeros(n, dtype=np.float64)
        self.col_sums = np.zeros(g, dtype=np.float64)
        tally = CountTally(g) if histogram else None
        for start, csr in self.blocks(where):
            stop = start + csr.shape[0]
            per_entry = sp.csr_matrix((gammaln(csr.data + 1.0), csr.indices, csr.indptr),
                                      shape=csr.shape)
            log_factorial[start:stop] = np.asarray(per_entry.sum(axis=1)).ravel()
            self.library[start:stop] = np.asarray(csr.sum(axis=1)).ravel()
            self.col_sums += np.asarray(csr.sum(axis=0)).ravel()
            if tally is not None:
                tally.add(csr)
        self.log_factorial = torch.from_numpy(log_factorial.astype(np.float32)).to(device)
        self.count_histogram = tally.histogram(device) if tally is not None else None
        self._resident = _Buffer(np.zeros(0, dtype=np.int64), sp.csr_matrix((0, g)))
        self._current = self._resident
        self._plan: list[np.ndarray] = []
        self._at = -1
        self._pending: dict[int, Future] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advcli-read")

    def blocks(self, check: str | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first row, counts as float64 CSR) for one row block after another: a streaming
        pass. ``check``: the matrix's name, to check every value (all genes) on the way."""
        for start, part in iter_row_blocks(self.matrix):
            if check is not None:
                check_count_block(part, start, check)
            yield start, self._select(_as_csr(part)).astype(np.float64)

    def _select(self, csr: sp.csr_matrix) -> sp.csr_matrix:
        return csr if self.columns is None else csr[:, self.columns]

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of the sorted ``rows`` (float32 CSR): runs of whole chunks when the rows fill
        them (a buffer), else just those rows (held-out cells, a sample)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        chunks = np.unique(rows // CHUNK_ROWS)
        if 2 * len(rows) < len(chunks) * CHUNK_ROWS:  # scattered: whole chunks would be waste
            have = np.unique(rows)
            block = _as_csr(read_rows(self.matrix, have))
        else:
            breaks = np.flatnonzero(np.diff(chunks) > 1) + 1
            parts, first = [], []
            for run in np.split(chunks, breaks):
                start = int(run[0]) * CHUNK_ROWS
                stop = min((int(run[-1]) + 1) * CHUNK_ROWS, self.shape[0])
                parts.append(_as_csr(self.matrix[start:stop]))
                first.append(np.arange(start, stop))
            block = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
            have = np.concatenate(first)
        if len(have) != len(rows) or (have != rows).any():
            block = block[np.searchsorted(have, rows)]
        return self._select(block).astype(np.float32, copy=False)

    def hold(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (e.g. the validation cells) in memory for good."""
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        self._resident = _Buffer(rows, self.read(rows))

    def plan(self, buffers: Sequence[np.ndarray]) -> None:
        """The order in which minibatches will visit groups of rows: each buffer is read (ahead,
        on a background thread) just before its rows are needed."""
        for future in self._pending.values():
            future.cancel()
        self._plan = [np.asarray(b, dtype=np.int64) for b in buffers]
        self._pending, self._at = {}, -1
        self._current = _Buffer(np.zeros(0, dtype=np.int64), sp.csr_matrix((0, self.shape[1])))
        self._prefetch(0)

    def shuffled_buffers(self, generator, keep: np.ndarray) -> list[np.ndarray]:
        """One epoch's buffers: whole chunks in a seeded random order, dealt into buffers of
        about BUFFER_ROWS rows; each buffer lists its rows where ``keep`` is true, sorted."""
        import torch

        n = self.shape[0]
        n_chunks = math.ceil(n / CHUNK_ROWS)
        order = torch.randperm(n_chunks, generator=generator).numpy()
        per = max(1, BUFFER_ROWS // CHUNK_ROWS)
        buffers = []
        for i in range(0, n_chunks, per):
            chunks = np.sort(order[i:i + per])
            rows = (chunks[:, None] * CHUNK_ROWS + np.arange(CHUNK_ROWS)).ravel()
            rows = rows[rows < n]
            rows = rows[keep[rows]]
            if len(rows):
                buffers.append(rows)
        self.plan(buffers)
        return buffers

    def sequential_plan(self, block: int = BLOCK_ROWS // 2) -> None:
        """Plan a pass over every row in file order (predict): nothing to shuffle, so smaller
        blocks than training's buffers."""
        n = self.shape[0]
        self.plan([np.arange(s, min(s + block, n)) for s in range(0, n, block)])

    def _prefetch(self, i: int) -> None:
        if 0 <= i < len(self._plan) and i not in self._pending:
            self._pending[i] = self._reader.submit(self.read, self._plan[i])

    def _take(self, idx: np.ndarray) -> sp.csr_matrix:
        if len(idx) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        for buffer in (self._resident, self._current):
            found = buffer.take(idx)
            if found is not None:
                return found
        for i in range(self._at + 1, len(self._plan)):  # the next planned buffer holding them
            plan = self._plan[i]
            pos = np.searchsorted(plan, idx[:1])
            if pos[0] < len(plan) and plan[pos[0]] == idx[0]:
                self._prefetch(i)
                csr = self._pending.pop(i).result()
                for j in [j for j in self._pending if j < i]:
                    self._pending.pop(j).cancel()
                self._current, self._at = _Buffer(plan, csr), i
                self._prefetch(i + 1)
                found = self._current.take(idx)
                if found is not None:
                    return found
                break
        order = np.argsort(idx)  # not planned: read these rows directly
        csr = self.read(idx[order])
        return csr[np.argsort(order)]

    def rows(self, idx):
        import torch

        idx_np = idx.cpu().numpy().astype(np.int64)
        return torch.from_numpy(self._take(idx_np).toarray()).to(self.device)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)


class LogNormalisedRows:
    """log1p(counts / size factor) of counts on disk, computed for the rows asked for (sorted):
    what the SVA-like start of Z reads, without a second copy of the data."""

    def __init__(self, rows: BackedCountRows, offset: np.ndarray):
        self.rows, self.scale = rows, np.exp(-np.asarray(offset, dtype=np.float64))
        self.shape = rows.shape

    def __getitem__(self, idx) -> sp.csr_matrix:
        idx = np.asarray(idx, dtype=np.int64)
        out = sp.csr_matrix(sp.diags(self.scale[idx]) @ self.rows.read(idx).astype(np.float64))
        out.data = np.log1p(out.data)
        return out


def streamed_gene_statistics(rows: BackedCountRows, offset: np.ndarray):
    """One pass: per gene, the mean and SD of log1p(counts / size factor), and the sums the NB
    moment estimates need (sum y, known from the first pass; sum y^2, sum y s), with
    s = exp(offset)."""
    g = rows.shape[1]
    log_sum, log_sq, y_sq, y_s = (np.zeros(g) for _ in range(4))
    for start, block in rows.blocks():
        off = np.asarray(offset[start:start + block.shape[0]], dtype=np.float64)
        log_y = sp.csr_matrix(sp.diags(np.exp(-off)) @ block)
        log_y.data = np.log1p(log_y.data)
        log_sum += np.asarray(log_y.sum(axis=0)).ravel()
        log_sq += np.asarray(log_y.multiply(log_y).sum(axis=0)).ravel()
        y_sq += np.asarray(block.multiply(block).sum(axis=0)).ravel()
        y_s += np.asarray(block.T @ np.exp(off)).ravel()
    n = rows.shape[0]
    mean = log_sum / n
    sd = np.sqrt(np.maximum(log_sq / n - mean ** 2, 0.0))
    return mean, sd, (rows.col_sums, y_sq, y_s)


class BackedAnnData:
    """The parts of an .h5ad that advcli reads, with X and every layer left on disk.

    anndata's own backed mode leaves X on disk but loads the layers, which in a prediction
    file (``nb_mean``: cells x genes floats) are the largest part. Here obs, var, obsm and uns
    are read; X and the layers are CSR datasets or HDF5 arrays read by rows on demand.
    """

    isbacked = True
    raw = None

    def __init__(self, path, mode: str = "r"):
        import h5py
        import pandas as pd
        from anndata.io import read_elem

        self.filename = str(path)
        self.file = h5py.File(path, mode)
        f = self.file
        try:
            self.obs = read_elem(f["obs"]) if "obs" in f else None
            self.var = read_elem(f["var"]) if "var" in f else None
            n_obs, n_vars = self._shape(f)
            if self.obs is None:
                self.obs = pd.DataFrame(index=pd.RangeIndex(n_obs).astype(str))
            if self.var is None:
                self.var = pd.DataFrame(index=pd.RangeIndex(n_vars).astype(str))
            self.obsm = {k: read_elem(v) for k, v in f["obsm"].items()} if "obsm" in f else {}
            self.uns = dict(read_elem(f["uns"])) if "uns" in f else {}
            self.X = _lazy(f["X"]) if "X" in f else None
            self.layers = {k: _lazy(v) for k, v in f["layers"].items()} if "layers" in f else {}
        except BaseException:
            f.close()
            raise
        if self.X is not None and tuple(self.X.shape) != (len(self.obs), len(self.var)):
            f.close()
            raise ValueError(f"X is {tuple(self.X.shape)} but obs and var describe "
                             f"{len(self.obs)} x {len(self.var)}")

    @staticmethod
    def _shape(f) -> tuple[int, int]:
        if "X" not in f:
            return 0, 0
        x = f["X"]
        shape = x.attrs.get("shape") if hasattr(x, "attrs") and "shape" in x.attrs else x.shape
        return int(shape[0]), int(shape[1])

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    @property
    def obs_names(self):
        return self.obs.index

    @property
    def var_names(self):
        return self.var.index

    def select_genes(self, columns: np.ndarray) -> "BackedAnnData":
        """The same file seen through the genes ``columns`` (X and layers still on disk)."""
        import copy

        view = copy.copy(self)
        view.var = self.var.iloc[columns]
        view.X = None if self.X is None else _Columns(self.X, columns)
        view.layers = {k: _Columns(v, columns) for k, v in self.layers.items()}
        return view

    def to_memory(self, cells: np.ndarray):
        """An in-memory AnnData of the rows ``cells`` (sorted): every matrix read for those
        cells only."""
        import anndata as ad

        def rows(matrix):
            part = read_rows(matrix, cells)
            return sp.csr_matrix(part) if sp.issparse(part) else np.asarray(part)

        return ad.AnnData(X=None if self.X is None else rows(self.X),
                          obs=self.obs.iloc[cells].copy(), var=self.var.copy(),
                          obsm={k: np.asarray(v)[cells] for k, v in self.obsm.items()},
                          layers={k: rows(v) for k, v in self.layers.items()},
                          uns=dict(self.uns))

    def save(self) -> None:
        """Write obs, obsm and uns (changed in memory) back to the file; X and the layers were
        written in place."""
        from anndata.io import write_elem

        for key, value in (("obs", self.obs), ("obsm", dict(self.obsm)), ("uns", dict(self.uns))):
            if key in self.file:
                del self.file[key]
            write_elem(self.file, key, value)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _Columns:
    """A matrix on disk seen through some of its columns: rows are read, then cut."""

    def __init__(self, matrix, columns: np.ndarray):
        self.matrix, self.columns = matrix, np.asarray(columns)
        self.shape = (matrix.shape[0], len(self.columns))
        self.dtype = matrix.dtype
        self.format = getattr(matrix, "format", None)

    def __getitem__(self, rows):
        return self.matrix[rows][:, self.columns]


def _lazy(elem):
    """A CSR / CSC group as anndata's on-disk sparse dataset; a dense array as the HDF5 dataset."""
    import h5py
    from anndata.io import sparse_dataset

    if isinstance(elem, h5py.Group):
        return sparse_dataset(elem)
    return elem


class LayerSink:
    """Per-gene layers of a prediction (cells x the file's genes): gathered in memory, or for a
    BackedAnnData written into its file block by block."""

    def __init__(self, adata, names: list[str]):
        self.adata, self.names = adata, names
        self.backed = isinstance(adata, BackedAnnData)
        self.parts: dict[str, list] = {name: [] for name in names}
        self.datasets = {}
        if getattr(adata, "isbacked", False) and not self.backed and names:
            raise InputError("Per-gene layers cannot be added to an AnnData opened with "
                             "anndata's backed mode; open it with advcli.read_backed(path, "
                             "'r+') or pass nb_mean=False.")
        if self.backed and names:
            if self.adata.file.mode != "r+":
                raise InputError("The backed file is open read-only; open it with mode 'r+' to "
                                 "write per-gene layers, or pass nb_mean=False.")
            group = self.adata.file.require_group("layers")
            group.attrs.setdefault("encoding-type", "dict")
            group.attrs.setdefault("encoding-version", "0.1.0")
            n, g = adata.n_obs, adata.n_vars
            for name in names:
                if name in group:
                    del group[name]
                ds = group.create_dataset(name, shape=(n, g), dtype="float32",
                                          chunks=(max(1, min(n, 256)), g) if n * g else None)
                ds.attrs["encoding-type"] = "array"
                ds.attrs["encoding-version"] = "0.2.0"
                self.datasets[name] = ds

    def write(self, name: str, start: int, values: np.ndarray) -> None:
        if self.backed:
            self.datasets[name][start:start + values.shape[0]] = values
        else:
            self.parts[name].append(values)

    def finish(self) -> None:
        for name in self.names:
            if self.backed:
                self.adata.layers[name] = self.datasets[name]
            else:
                self.adata.layers[name] = np.concatenate(self.parts[name])
