"""run_probing: planted signals, controls, grouped splits against leakage, errors, a real store."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.model_selection import KFold

from aligned_probing.probing import DEFAULT_ALPHAS, MDL_COLUMNS, RESULT_COLUMNS, RidgeProbe, run_probing


class FakeStore:
    """In-memory stand-in for ActivationStore: arrays {(position, pooling): [L + 1, n, d]} and an index."""

    def __init__(self, arrays, index, *, model_name="fake", template=0):
        self.arrays, self.index = arrays, index
        self.n_layers = next(iter(arrays.values())).shape[0] - 1
        self.model_name, self.template = model_name, template
        self.positions = tuple(sorted({p for p, _ in arrays}))
        self.poolings = tuple(sorted({q for _, q in arrays}))

    def layer(self, layer, position="input", pooling="mean"):
        return self.arrays[(position, pooling)][layer]


def make_data(rng, n_prompts=120, k=3, d=16, n_layers=3, strength=(0.0, 1.0, 0.3, 0.1)):
    """Planted data: layer l encodes the prompt latent (input) and continuation latent (output) with
    weight strength[l]; `toxicity` is decodable, `noise` scores are independent of everything."""
    prompts = [f"p{i:03d}" for i in range(n_prompts)]
    z = rng.normal(size=n_prompts)  # prompt latent
    u = z[:, None] * 0.5 + rng.normal(size=(n_prompts, k))  # continuation latents
    w_in, w_out = rng.normal(size=d), rng.normal(size=d)
    index = pd.DataFrame(
        {"prompt_id": np.repeat(prompts, k), "continuation_idx": np.tile(np.arange(k), n_prompts)}
    )
    zi, ui = np.repeat(z, k), u.reshape(-1)
    shape = (n_layers + 1, len(index), d)
    inp = np.empty(shape, np.float32)
    out = np.empty(shape, np.float32)
    for layer in range(n_layers + 1):
        s = strength[layer]
        base = np.repeat(rng.normal(size=(n_prompts, d)), k, axis=0)  # input encoding is per prompt
        inp[layer] = s * zi[:, None] * w_in + base
        out[layer] = s * ui[:, None] * w_out + rng.normal(size=(len(index), d))
    targets = index.assign(
        prompt_toxicity=expit(zi),
        toxicity=expit(ui),
        prompt_noise=np.repeat(rng.uniform(size=n_prompts), k),
        noise=rng.uniform(size=len(index)),
    )
    return FakeStore({("input", "mean"): inp, ("output", "mean"): out}, index), targets


@pytest.fixture
def planted(rng):
    return make_data(rng)


def test_schema_and_row_count(planted):
    store, targets = planted
    df = run_probing(store, targets, seeds=(0, 1), n_folds=3)
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert len(df) == 4 * 4 * 2 * 3 * 2  # layers x scenarios x attributes x folds x seeds
    assert set(df.scenario) == {"input", "forward", "output", "backward"}
    assert set(df.attribute) == {"toxicity", "noise"}
    np.testing.assert_allclose(df.relative_depth, df.layer / 3)
    assert (df.model == "fake").all() and (df.template == 0).all() and (df.n_layers == 3).all()
    # one row per prompt for every scenario (designated continuation 0 for forward/output)
    assert ((df.n_train + df.n_test) == 120).all() and (df.n_rows_lost == 0).all()
    np.testing.assert_allclose(df.selectivity, df.pearson - df.control_pearson)


def test_planted_signal_noise_and_controls(rng):
    store, targets = make_data(rng, n_prompts=400)
    df = run_probing(store, targets, seeds=(0, 1, 2), n_folds=4)
    mean = df.groupby(["scenario", "attribute", "layer"])[
        ["pearson", "control_pearson", "selectivity"]
    ].mean()
    for scenario in ("input", "output"):  # targets that are (monotone functions of) the encoded latent
        assert mean.loc[(scenario, "toxicity", 1), "pearson"] > 0.85
        assert mean.loc[(scenario, "toxicity", 1), "selectivity"] > 0.8
        assert mean.loc[(scenario, "toxicity", 0), "pearson"] < 0.3  # layer 0 has no signal
    # forward/backward only see the prompt-continuation correlation: weaker but clearly positive
    assert (
        0.2 < mean.loc[("backward", "toxicity", 1), "pearson"] < mean.loc[("input", "toxicity", 1), "pearson"]
    )
    assert mean.loc[("forward", "toxicity", 1), "pearson"] > 0.2
    # noise: per (scenario, layer), the mean of 12 fold x seed values of r (100 test prompts) has sd ~0.06
    noise = mean.xs("noise", level="attribute")
    assert noise.pearson.abs().max() < 0.2
    assert abs(noise.pearson.mean()) < 0.05
    assert noise.selectivity.abs().max() < 0.2
    assert mean.control_pearson.abs().max() < 0.15


def test_grouped_folds_block_leakage_through_duplicated_prompts(rng):
    # Each prompt has an identity vector, repeated (with tiny noise) in its 4 continuations' output encodings;
    # the target is a random per-prompt value. Only memorising prompts can predict it, which a row-wise split
    # rewards (leak) and a prompt-grouped split does not.
    n_prompts, k, d = 60, 4, 80
    ident = np.repeat(rng.normal(size=(n_prompts, d)), k, axis=0)
    X = ident + 0.05 * rng.normal(size=ident.shape)
    y = np.repeat(rng.uniform(size=n_prompts), k)
    index = pd.DataFrame(
        {
            "prompt_id": np.repeat([f"p{i}" for i in range(n_prompts)], k),
            "continuation_idx": np.tile(np.arange(k), n_prompts),
        }
    )
    store = FakeStore({("output", "mean"): np.stack([X, X])}, index)
    targets = index.assign(prompt_leak=y, leak=y)
    df = run_probing(
        store, targets, scenarios=["output"], output_continuations="all", seeds=(0, 1), layers=[1]
    )
    assert (df.n_train + df.n_test == n_prompts * k).all()
    assert abs(df.pearson.mean()) < 0.2
    # the same probe with a row-wise (leaky) split: prompt memorisation gives a high r
    leaky = []
    for train, test in KFold(4, shuffle=True, random_state=0).split(X):
        pred = RidgeProbe().fit(X[train], y[train]).predict(X[test])
        leaky.append(np.corrcoef(pred, y[test])[0, 1])
    assert np.mean(leaky) > 0.9


def test_folds_are_shared_across_scenarios_and_seeded(planted):
    store, targets = planted
    a = run_probing(store, targets, seeds=(3,), n_folds=4, layers=[1], control=False)
    b = run_probing(store, targets, seeds=(3,), n_folds=4, layers=[1], control=False)
    pd.testing.assert_frame_equal(a, b)
    # same prompts per fold for every scenario (one row per prompt everywhere)
    assert a.groupby("fold").n_test.nunique().eq(1).all()
    c = run_probing(store, targets, seeds=(4,), n_folds=4, layers=[1], control=False)
    assert not np.allclose(a.pearson, c.pearson)
    assert a.control_pearson.isna().all() and a.selectivity.isna().all()


def test_backward_target_is_max_over_continuations(rng):
    # The input encoding carries the max continuation score exactly: backward r = 1, input r < 1.
    n_prompts, k, d = 40, 3, 6
    cont = rng.uniform(size=(n_prompts, k))
    mx = cont.max(axis=1)
    base = rng.normal(size=(n_prompts, d))
    base[:, 0] = mx
    X = np.repeat(base, k, axis=0)
    index = pd.DataFrame(
        {
            "prompt_id": np.repeat([f"p{i}" for i in range(n_prompts)], k),
            "continuation_idx": np.tile(np.arange(k), n_prompts),
        }
    )
    targets = index.assign(
        prompt_toxicity=np.repeat(rng.uniform(size=n_prompts), k), toxicity=cont.reshape(-1)
    )
    store = FakeStore({("input", "mean"): np.stack([X, X])}, index)
    df = run_probing(store, targets, scenarios=["backward"], seeds=(0,), layers=[0], alphas=(1e-6,))
    assert df.pearson.min() > 0.9999
    assert (df.n_train + df.n_test == n_prompts).all()


def test_output_continuations_all_uses_every_continuation(planted):
    store, targets = planted
    df = run_probing(
        store,
        targets,
        scenarios=["output"],
        output_continuations="all",
        seeds=(0,),
        layers=[1],
        attributes=["toxicity"],
    )
    assert (df.n_train + df.n_test == 360).all()
    assert df.pearson.mean() > 0.85


def test_mdl_columns(planted):
    store, targets = planted
    df = run_probing(store, targets, scenarios=["input"], seeds=(0,), n_folds=2, layers=[0, 1], mdl=True)
    assert list(df.columns) == list(RESULT_COLUMNS) + list(MDL_COLUMNS)
    gain = df.groupby(["attribute", "layer"])[["mdl_gain_baseline", "mdl_gain_control"]].mean()
    assert (gain.loc[("toxicity", 1)] > 0.3).all()  # bits per sample
    assert (gain.loc[("toxicity", 1)] > gain.loc[("toxicity", 0)] + 0.2).all()
    assert (gain.xs("noise", level="attribute") < 0.05).all().all()  # no information, no gain
    np.testing.assert_allclose(
        df.mdl_gain_baseline, (df.baseline_codelength - df.online_codelength) / df.mdl_n, rtol=1e-12
    )
    np.testing.assert_allclose(
        df.mdl_gain_control, (df.control_codelength - df.online_codelength) / df.mdl_n, rtol=1e-12
    )
    assert (df.mdl_n == df.n_train).all()


def test_mdl_all_continuations_mode_has_no_gain_without_information(rng):
    # Prompt vectors repeated in every continuation's encoding, prompt-level targets unrelated to them:
    # blocks of whole prompts leave nothing to memorise, so the gain over the baseline is ~0.
    n_prompts, k, d = 96, 5, 40
    X = np.repeat(rng.normal(size=(n_prompts, d)), k, axis=0) + 0.05 * rng.normal(size=(n_prompts * k, d))
    y = np.clip(np.repeat(rng.uniform(size=n_prompts), k) + 0.02 * rng.normal(size=n_prompts * k), 0, 1)
    index = pd.DataFrame(
        {
            "prompt_id": np.repeat([f"p{i:03d}" for i in range(n_prompts)], k),
            "continuation_idx": np.tile(np.arange(k), n_prompts),
        }
    )
    store = FakeStore({("output", "mean"): np.stack([X, X])}, index)
    targets = index.assign(prompt_leak=y, leak=y)
    df = run_probing(
        store, targets, scenarios=["output"], output_continuations="all", seeds=(0, 1), layers=[1], mdl=True
    )
    assert df.mdl_gain_baseline.mean() < 0.02
    assert abs(df.mdl_gain_control.mean()) < 0.1


def test_all_continuations_mode_selects_alpha_leaving_prompts_out(rng):
    # Same no-information design: leave-one-row-out alpha selection sees the held-out row's siblings and
    # picks a small (memorising) alpha; the sweep's leave-one-prompt-out picks a large one.
    n_prompts, k, d = 60, 4, 80
    X = np.repeat(rng.normal(size=(n_prompts, d)), k, axis=0) + 0.05 * rng.normal(size=(n_prompts * k, d))
    y = np.repeat(rng.uniform(size=n_prompts), k)
    index = pd.DataFrame(
        {
            "prompt_id": np.repeat([f"p{i}" for i in range(n_prompts)], k),
            "continuation_idx": np.tile(np.arange(k), n_prompts),
        }
    )
    store = FakeStore({("output", "mean"): np.stack([X, X])}, index)
    df = run_probing(
        store,
        index.assign(prompt_leak=y, leak=y),
        scenarios=["output"],
        output_continuations="all",
        seeds=(0,),
        layers=[1],
        control=False,
    )
    loo_alpha = RidgeProbe().fit(X, y).alpha_
    assert loo_alpha <= 1.0
    assert df.alpha.median() >= 100 * loo_alpha and (df.alpha > loo_alpha).all()


@pytest.mark.parametrize("continuations", [0, "all"])  # "all": grouped alpha selection, grouped MDL
def test_torch_backend_gives_the_same_table(planted, continuations):
    store, targets = planted
    kw = dict(seeds=(0, 1), n_folds=3, layers=[0, 1, 2, 3], mdl=True, output_continuations=continuations)
    ref = run_probing(store, targets, **kw)
    got = run_probing(store, targets, backend="torch", device="cpu", layer_batch=3, **kw)
    pd.testing.assert_frame_equal(got, ref, rtol=1e-6, atol=1e-9)


def test_nan_targets_error_and_dropna(planted):
    store, targets = planted
    bad = targets.copy()
    bad.loc[[0, 5], "toxicity"] = np.nan
    with pytest.raises(ValueError, match=r"'toxicity': 2 of 360 rows"):
        run_probing(store, bad, seeds=(0,))
    with pytest.warns(UserWarning, match="dropped 2 of 360 target rows"):
        df = run_probing(store, bad, seeds=(0,), layers=[1], scenarios=["output"], dropna=True)
    # rows 0 and 5 are (p000, 0) and (p001, 2): only p000 loses its designated continuation
    assert (df.n_train + df.n_test == 119).all()


def test_mismatched_lengths_error(planted):
    store, targets = planted
    with pytest.raises(ValueError, match="Mismatched store and targets: 3 of 360 store samples"):
        run_probing(store, targets[targets.prompt_id != "p007"], scenarios=["input"], seeds=(0,))
    short = FakeStore({key: a[:, :-1] for key, a in store.arrays.items()}, store.index)
    with pytest.raises(ValueError, match=r"has shape \(359, 16\), but the store index has 360 rows"):
        run_probing(short, targets, seeds=(0,))


def test_too_few_samples_for_folds(rng):
    store, targets = make_data(rng, n_prompts=7)
    with pytest.raises(ValueError, match=r"Too few samples for n_folds=4: need at least 8 prompts .* got 7"):
        run_probing(store, targets, seeds=(0,))


def test_argument_errors(planted):
    store, targets = planted
    with pytest.raises(ValueError, match="scenarios must be a non-empty subset of"):
        run_probing(store, targets, scenarios=["sideways"])
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean',\) in this store, got 'last'"):
        run_probing(store, targets, pooling="last")
    with pytest.raises(ValueError, match="output_continuations must be an int >= 0 or 'all'"):
        run_probing(store, targets, output_continuations=-2)
    with pytest.raises(
        ValueError, match=r"layers must be a non-empty sequence of ints in \[0, 3\], got \[4\]"
    ):
        run_probing(store, targets, layers=[4])
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence of ints"):
        run_probing(store, targets, seeds=3)
    input_only = FakeStore({("input", "mean"): store.arrays[("input", "mean")]}, store.index)
    with pytest.raises(ValueError, match="need the 'output' position"):
        run_probing(input_only, targets, scenarios=["output"])


def test_constant_test_target_gives_nan_and_warning(planted):
    store, targets = planted
    targets = targets.assign(prompt_flat=0.5, flat=0.5)
    with pytest.warns(UserWarning, match="pearson = NaN"):
        df = run_probing(
            store, targets, scenarios=["input"], attributes=["flat", "toxicity"], seeds=(0,), layers=[1]
        )
    assert df[df.attribute == "flat"].pearson.isna().all()
    assert df[df.attribute == "toxicity"].pearson.notna().all()


def test_nan_activation_rows_dropped_and_counted(planted):
    store, targets = planted
    out = store.arrays[("output", "mean")].copy()
    out[:, [0, 3, 4]] = np.nan  # continuation 0 of p000 and p001 (rows 0, 3) and (p001, 1)
    broken = FakeStore(
        {("input", "mean"): store.arrays[("input", "mean")], ("output", "mean"): out}, store.index
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported in the table, not by a warning
        df = run_probing(broken, targets, seeds=(0,), layers=[1])
    lost = df.groupby("scenario").n_rows_lost.unique()
    assert lost["output"].tolist() == [2] and lost["forward"].tolist() == [2]
    assert lost["input"].tolist() == [0] and lost["backward"].tolist() == [0]
    assert (df.query("scenario == 'output'").eval("n_train + n_test") == 118).all()
    torch_df = run_probing(broken, targets, seeds=(0,), layers=[1], backend="torch", device="cpu")
    pd.testing.assert_frame_equal(torch_df, df, rtol=1e-6, atol=1e-9)


def test_through_a_real_activation_store(planted, tmp_path):
    from aligned_probing.encoding.store import ActivationStore

    fake, targets = planted
    store = ActivationStore.create(
        tmp_path / "store", model="fake", template=0, n_layers=3, d_model=16, positions=("input", "output")
    )
    store.append(fake.index, {(p, "mean"): a for (p, _), a in fake.arrays.items()})
    store = ActivationStore.open(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        real = run_probing(store, targets, seeds=(0,), layers=[0, 1])
    expected = run_probing(fake, targets, seeds=(0,), layers=[0, 1])
    pd.testing.assert_frame_equal(real, expected)


def test_summary_of_a_sweep_finds_the_planted_peak(planted):
    from aligned_probing.probing import peak_layers, summarize

    store, targets = planted
    df = run_probing(store, targets, scenarios=["input", "output"], attributes=["toxicity"], seeds=(0, 1))
    peaks = peak_layers(summarize(df)).set_index("scenario")
    assert (peaks.layer == 1).all()  # the layer with the strongest planted encoding
    assert (peaks.ci_low > 0.7).all()


@pytest.mark.parametrize("grouped", [False, True])
def test_sweep_fold_fits_from_the_shared_gram_equal_probes_on_the_training_rows(rng, grouped):
    # The sweep downdates one Gram matrix per layer to each fold (numpy backend); the records must equal
    # those of a RidgeProbe fitted on the fold's finite training rows, NaN rows and groups included.
    from aligned_probing.probing._foldgram import FoldGram
    from aligned_probing.probing.sweep import _fit_fold, _fit_fold_gram

    n, p = 200, 12
    X = rng.normal(size=(n, p)) * np.exp(rng.normal(size=p)) + 30.0
    Y = np.column_stack([X[:, 0] + rng.normal(size=n), rng.normal(size=n)])
    Y = np.hstack([Y, Y[rng.permutation(n)]])  # real targets, then control targets
    X[[3, 50, 51]] = np.nan
    finite = np.isfinite(X).all(axis=1)
    groups = np.repeat(np.arange(n // 4), 4) if grouped else None
    columns = [("input", "toxicity"), ("input", "noise")]
    shared = FoldGram(X, rows=finite)
    for fold in range(4):
        train, test = finite & (np.arange(n) % 4 != fold), finite & (np.arange(n) % 4 == fold)
        got = _fit_fold_gram(shared, X, Y, columns, train, test, DEFAULT_ALPHAS, True, groups)
        ref = _fit_fold(RidgeProbe(), X, Y, columns, train, test, True, groups)
        for g, r in zip(got, ref, strict=True):
            assert g.keys() == r.keys() and g["alpha"] == r["alpha"]
            for key in ("pearson", "r2", "rmse", "control_pearson", "selectivity"):
                np.testing.assert_allclose(g[key], r[key], rtol=1e-8, atol=1e-12)
        assert got[0]["pearson"] > 0.5 and abs(got[1]["pearson"]) < 0.4  # planted signal vs noise


def test_bad_alphas_rejected_by_the_sweep(planted):
    store, targets = planted
    with pytest.raises(ValueError, match="alphas must be a non-empty sequence of finite values > 0"):
        run_probing(store, targets, alphas=(0.0, 1.0), layers=[1], seeds=(0,))
