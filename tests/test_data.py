"""The validation layer: every bad input becomes an InputError that names what was wrong."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from advcli.data import (CovariateEncoding, encode_domains, encode_treatment, gene_order,
                         load_counts, read_h5ad, stratified_minibatches, validate_counts)
from advcli.errors import InputError
from conftest import make_adata


def test_read_missing_file_and_non_h5ad(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_h5ad(tmp_path / "nope.h5ad")
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable .h5ad"):
        read_h5ad(bad)
    with pytest.raises(InputError, match="folder"):
        read_h5ad(tmp_path)


def test_truncated_h5ad_is_an_input_error(tmp_path, write):
    path = write(make_adata())
    data = path.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        read_h5ad(cut)


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (-1.0, "negative"),
                                         (0.5, "non-integer"), (np.inf, "NaN or infinite")])
@pytest.mark.parametrize("sparse", [True, False])
def test_bad_counts(value, match, sparse):
    adata = make_adata()
    dense = adata.X.toarray()
    dense[3, 2] = value
    adata.X = sp.csr_matrix(dense) if sparse else dense
    with pytest.raises(InputError, match=match):
        validate_counts(adata)


def test_float_whole_numbers_and_integer_dtypes_are_fine():
    adata = make_adata()
    adata.X = adata.X.toarray().astype(np.int32)
    validate_counts(adata)
    assert load_counts(adata).dtype == np.float32


def test_empty_data_and_string_matrix():
    adata = make_adata()
    with pytest.raises(InputError, match="at least one"):
        validate_counts(adata[:0].copy())
    with pytest.raises(InputError, match="at least one"):
        validate_counts(adata[:, :0].copy())


def test_duplicate_gene_names():
    adata = make_adata()
    adata.var_names = ["g0"] * adata.n_vars
    with pytest.raises(InputError, match="not unique"):
        validate_counts(adata)


def test_missing_layer_lists_existing_layers():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(InputError, match="'raw' not found.*'counts'"):
        validate_counts(adata, "raw")
    validate_counts(adata, "counts")


def test_backed_reading_validates_in_blocks(write, monkeypatch):
    import advcli.data as data

    monkeypatch.setattr(data, "BLOCK_ROWS", 7)
    adata = make_adata(n=30)
    dense = adata.X.toarray()
    dense[25, 1] = -3
    adata.X = sp.csr_matrix(dense)
    path = write(adata)
    backed = read_h5ad(path, backed=True)
    assert backed.isbacked
    with pytest.raises(InputError, match="negative"):
        validate_counts(backed)


def test_treatment_encodings():
    n = 40
    base = make_adata(n=n)
    d01, levels = encode_treatment(base, "D")
    assert set(np.unique(d01)) == {0.0, 1.0} and levels == ["0", "1"]
    a = make_adata(n=n, T=np.where(np.arange(n) % 2 == 0, "ctrl", "stim"))
    d, levels = encode_treatment(a, "T")
    assert levels == ["ctrl", "stim"] and d[1] == 1.0 and d[0] == 0.0
    d, levels = encode_treatment(a, "T", treated_level="ctrl")
    assert levels == ["stim", "ctrl"] and d[0] == 1.0
    cat = make_adata(n=n, T=pd.Categorical(np.where(np.arange(n) % 2 == 0, "z", "a"),
                                           categories=["z", "a"]))
    d, levels = encode_treatment(cat, "T")
    assert levels == ["z", "a"] and d[1] == 1.0  # categorical order, not sorted order
    b = make_adata(n=n, T=np.arange(n) % 2 == 0)
    d, _ = encode_treatment(b, "T")
    assert d[0] == 1.0


@pytest.mark.parametrize("values,match", [
    (np.arange(40) % 3, "values"),
    (np.array(["a", "b", "c", "d"] * 10), "4 levels"),
    (np.zeros(40), "only one value"),
    (np.where(np.arange(40) < 3, np.nan, 1.0), "missing"),
])
def test_bad_treatments(values, match):
    with pytest.raises(InputError, match=match):
        encode_treatment(make_adata(n=40, T=values), "T")


def test_missing_treatment_key_lists_keys():
    with pytest.raises(InputError, match=r"Treatment key 'treat' not found.*'D'.*'group'"):
        encode_treatment(make_adata(), "treat")
    with pytest.raises(InputError, match="not a level"):
        encode_treatment(make_adata(n=40, T=np.where(np.arange(40) % 2, "u", "v")), "T", "w")


def test_covariate_encoding_roundtrip_and_errors():
    adata = make_adata(n=60, age=np.linspace(20, 80, 60))
    enc = CovariateEncoding.fit(adata, ["group", "age"])
    x = enc.transform(adata)
    assert enc.columns == ["group=b", "group=c", "age"]
    assert x.shape == (60, 3) and set(np.unique(x[:, 0])) <= {0.0, 1.0}
    again = CovariateEncoding.from_dict(enc.to_dict())
    assert np.array_equal(again.transform(adata), x)
    other = make_adata(n=60, age=np.linspace(20, 80, 60))
    other.obs["group"] = pd.Categorical(["a", "b", "zz"] * 20)
    with pytest.raises(InputError, match="not seen"):
        enc.transform(other)
    nan_age = make_adata(n=60, age=np.r_[np.nan, np.linspace(20, 80, 59)])
    with pytest.raises(InputError, match="missing"):
        enc.transform(nan_age)
    inf_age = make_adata(n=60, age=np.r_[np.inf, np.linspace(20, 80, 59)])
    with pytest.raises(InputError, match="infinite"):
        enc.transform(inf_age)
    text_age = make_adata(n=60, age=np.array(["old"] * 60))
    with pytest.raises(InputError, match="was numeric"):
        enc.transform(text_age)
    with pytest.raises(InputError, match="Covariate key 'nope' not found"):
        CovariateEncoding.fit(adata, ["nope"])
    with pytest.raises(InputError, match="at least two"):
        CovariateEncoding.fit(make_adata(n=10, one=np.array(["x"] * 10)), ["one"])


def test_domains():
    codes, domains = encode_domains(make_adata(n=10), "batch")
    assert domains == ["x", "y"] and codes.tolist() == [0] * 5 + [1] * 5
    with pytest.raises(InputError, match="single level"):
        encode_domains(make_adata(n=10, b=np.array(["x"] * 10)), "b")
    with pytest.raises(InputError, match="not trained on"):
        encode_domains(make_adata(n=10), "batch", ["x", "q"])
    with pytest.raises(InputError, match="Batch key 'bk' not found"):
        encode_domains(make_adata(n=10), "bk")


def test_gene_order_reorders_and_names_missing_genes():
    adata = make_adata(genes=5)
    assert gene_order(adata, ["g3", "g0"]).tolist() == [3, 0]
    with pytest.raises(InputError, match=r"lack 2 of the 3 genes.*gX, gY"):
        gene_order(adata, ["g1", "gX", "gY"])


def test_treated_level_flips_numeric_and_bool_treatments():
    a = make_adata(n=40)
    d, levels = encode_treatment(a, "D", "0")
    assert levels == ["1", "0"] and np.array_equal(d, 1.0 - a.obs["D"].to_numpy())
    b = make_adata(n=40, T=np.arange(40) % 2 == 0)
    d, levels = encode_treatment(b, "T", "False")
    assert levels == ["True", "False"] and d[1] == 1.0
    with pytest.raises(InputError, match="not a level"):
        encode_treatment(a, "D", "2")


def test_count_factors_finds_planted_structure_and_not_noise():
    from advcli.data import count_factors

    rng = np.random.default_rng(0)
    n, g = 600, 200
    noise = rng.normal(size=(n, g))
    assert count_factors(noise, 0) == 1  # at least one, none found
    factors = rng.normal(size=(n, 2)) @ rng.normal(size=(2, g)) * 0.6
    assert count_factors(noise + factors, 0) == 2


@pytest.mark.parametrize("z_dim, genes", [(1, 300), (1, 1000), (2, 300)])
def test_factor_count_finds_the_simulated_hidden_factors_with_many_genes(tmp_path, z_dim, genes):
    """Parallel analysis on the log1p counts beyond [X, D] counted 6 factors on the 1,000-gene
    simulation of one (log1p is not additive on the count model's log scale, and sparse genes'
    noise follows depth); on the count GLM's Pearson residuals it counts the simulated one. Two
    binary factors move the mean on the count scale along z1, z2 and z1 * z2, so 3 is right
    there too."""
    from advcli.data import CovariateEncoding, default_covariate_keys, factor_count
    from advcli.simulate import ConfounderSimulation, simulate_confounder

    path = tmp_path / "sim.h5ad"
    simulate_confounder(ConfounderSimulation(n=1000, genes=genes, setting="general", seed=0,
                                             z_dim=z_dim), path)
    a = ad.read_h5ad(path)
    x = CovariateEncoding.fit(a, default_covariate_keys(a)).transform(a)
    d, _ = encode_treatment(a, "D")
    counts = sp.csr_matrix(a.X)
    log_lib = np.log(np.asarray(counts.sum(axis=1)).ravel())
    k = factor_count(counts, log_lib - log_lib.mean(), np.column_stack([x, d]), 0)
    assert z_dim <= k <= 2 ** z_dim - 1


def test_gene_moments_match_the_simulated_dispersion():
    from advcli.data import gene_moments

    rng = np.random.default_rng(1)
    n, theta = 5000, 2.0
    sf = np.exp(rng.normal(0, 0.3, n))
    mu = 4.0 * sf[:, None] * np.ones((1, 3))
    y = sp.csr_matrix(rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32))
    log_mean, alpha = gene_moments(y, sf)
    np.testing.assert_allclose(np.exp(log_mean), 4.0, rtol=0.05)
    np.testing.assert_allclose(alpha, 1 / theta, atol=0.06)


def test_highly_variable_genes_find_the_overdispersed_ones():
    import scipy.sparse as sp

    from advcli.data import highly_variable_genes

    rng = np.random.default_rng(0)
    n, g = 1000, 120
    mu = rng.lognormal(0, 1, g)
    x = rng.poisson(mu, size=(n, g)).astype(float)
    planted = [3, 50, 77, 119]
    for j in planted:
        x[:, j] = rng.negative_binomial(0.5, 0.5 / (0.5 + mu[j]), size=n)
    batches = np.repeat(["a", "b"], n // 2)
    assert highly_variable_genes(sp.csr_matrix(x), 4, batches).tolist() == planted
    assert highly_variable_genes(sp.csr_matrix(x), 4).tolist() == planted
    assert highly_variable_genes(sp.csr_matrix(x), 500).tolist() == list(range(g))


@pytest.mark.parametrize("exact", [True, False])
def test_expression_pcs_are_the_principal_axes_of_normalised_expression(exact, monkeypatch):
    """The covariance path (every cell, float64) and the randomised path for many genes give
    the principal axes that sklearn finds, scaled so that the first component has unit
    variance and signed by their largest loading."""
    import torch
    from sklearn.decomposition import PCA

    from advcli import data
    from advcli.data import CountRows, expression_pcs

    if not exact:
        monkeypatch.setattr(data, "COVARIANCE_GENES", 10)
    rng = np.random.default_rng(0)
    n, g = 300, 40
    programme = rng.lognormal(0, 1, (3, g))  # three cell states of different expression
    state = rng.integers(0, 3, n)
    counts = rng.poisson(programme[state] * rng.uniform(0.5, 2, (n, 1)) * 5).astype(np.float32)
    rows = CountRows(sp.csr_matrix(counts), "cpu")
    genes = torch.arange(5, 40)
    mean, axes = expression_pcs(rows, 4, genes)
    library = counts.sum(1, keepdims=True)
    x = np.log1p(counts / library * 1e4)[:, 5:40]
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-5, atol=1e-5)
    pca = PCA(4).fit(x)
    for k in range(4):
        cosine = abs(np.dot(axes[:, k].numpy(), pca.components_[k])) / np.linalg.norm(axes[:, k])
        assert cosine > 0.999
        loading = axes[:, k].numpy()
        assert loading[np.abs(loading).argmax()] > 0
    scores = (x - mean.numpy()) @ axes.numpy()
    assert scores[:, 0].var(ddof=1) == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(scores.var(0, ddof=1),
                               pca.explained_variance_ / pca.explained_variance_[0], rtol=1e-3)


def test_stratified_minibatches_keep_every_domains_share_in_every_batch():
    import torch

    groups = [torch.arange(0, 600), torch.arange(600, 780), torch.arange(780, 840)]
    batches = stratified_minibatches(groups, 64, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(840))  # each cell once
    for b in batches[:-1]:
        counts = [int(((b >= g[0]) & (b <= g[-1])).sum()) for g in groups]
        for count, g in zip(counts, groups):
            assert abs(count - 64 * len(g) / 840) <= 2.0  # a plain shuffle: sd 3.2 for 46
    again = stratified_minibatches(groups, 64, torch.Generator().manual_seed(0))
    other = stratified_minibatches(groups, 64, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(batches[0], other[0])


@pytest.mark.parametrize("backed_file", [False, True])
def test_count_histogram_holds_every_gene_count_pair(tmp_path, monkeypatch, backed_file):
    """The per-gene histogram of nonzero counts, tallied block by block (small counts in a
    table, large ones sorted and merged across blocks), equals a direct count of the pairs."""
    import anndata as ad
    import torch

    from advcli import backed, data

    monkeypatch.setattr(data, "BLOCK_ROWS", 7)
    monkeypatch.setattr(backed, "BLOCK_ROWS", 7)
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(1, 0.02, (40, 6)).astype(np.float32)  # many counts over 64
    counts[:, 2] = 0.0  # a gene never seen
    counts[5, 4] = 70_000.0
    counts[0, 4] = counts[30, 4] = 100.0  # one large pair in two blocks
    assert (counts > backed.SMALL_COUNT).sum() > 20
    matrix = sp.csr_matrix(counts)
    matrix.data[matrix.indptr[3]] = 0.0  # a stored zero counts for nothing
    counts = matrix.toarray()
    if backed_file:
        path = tmp_path / "c.h5ad"
        ad.AnnData(X=matrix).write_h5ad(path)
        rows = data.count_rows(data.read_h5ad(path, backed=True), None, torch.device("cpu"),
                               histogram=True)
    else:
        rows = data.CountRows(matrix, torch.device("cpu"), histogram=True)
    hist = rows.count_histogram
    got = sorted(zip(hist.genes.tolist(), hist.counts.tolist(), (hist.share * 40).tolist()))
    want = []
    for g in range(6):
        values, n = np.unique(counts[:, g][counts[:, g] > 0], return_counts=True)
        want += [(g, float(v), float(k)) for v, k in zip(values, n)]
    assert [(g, c) for g, c, _ in got] == [(g, c) for g, c, _ in want]
    np.testing.assert_allclose([k for *_, k in got], [k for *_, k in want], rtol=1e-5)
    np.testing.assert_allclose(hist.nonzero_share.numpy(), (counts > 0).mean(axis=0), rtol=1e-5)
    assert data.CountRows(sp.csr_matrix(counts), torch.device("cpu")).count_histogram is None
