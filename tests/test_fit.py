"""Population fits (pkpd.fitting, `pkpd fit`): spec checking before sampling, atomic results
folders, parameter recovery and the M3 likelihood on a small simulated popPK design."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from pkpd import load_model, simulate
from pkpd.cli import main

TRUTH = {"CL": 5.0, "V": 50.0, "KA": 1.0}  # pk_1cmt_oral's file values (also prior medians)
LLOQ = 0.12  # mg/L


def _data(n: int = 30, seed: int = 3) -> pd.DataFrame:
    """1-cmt oral, 100 mg, 7 samples per subject, 15 % proportional error; samples below
    LLOQ are reported as CENS = 1 with DV = LLOQ (Monolix/nlmixr2 convention)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        rows.append(dict(ID=i, TIME=0.0, EVID=1, AMT=100.0, CMT=1, MDV=1, DV=np.nan))
        for t in (0.5, 1, 2, 4, 8, 16, 36):
            rows.append(dict(ID=i, TIME=float(t), EVID=0, AMT=0.0, CMT=2, MDV=0, DV=np.nan))
    df = pd.DataFrame(rows)
    cp = simulate(load_model("pk_1cmt_oral"), df, iiv=True, seed=seed)["CP"].to_numpy()
    dv = cp * (1 + 0.15 * rng.standard_normal(len(cp)))
    obs = df["EVID"].to_numpy() == 0
    cens = obs & (dv < LLOQ)
    df["DV"] = np.where(obs, np.where(cens, LLOQ, dv), np.nan)
    df["CENS"] = cens.astype(int)
    return df


SPEC = """
[fit]
name = "{name}"
model = "{model}"
data = "data.csv"

[[endpoints]]
output = "CP"
error = "proportional"
{endpoint_extra}

[priors]
{priors}

[sampler]
chains = {chains}
draws = 300
tune = 300
seed = 11
target_accept = {ta}
"""


def _spec(tmp_path, name="small", model="pk_1cmt_oral", endpoint_extra="", priors="",
          chains=2, ta=0.9, data=None):
    (tmp_path / "data.csv").write_text((data if data is not None else _data()).to_csv(
        index=False, na_rep="."))
    p = tmp_path / f"{name}.toml"
    p.write_text(SPEC.format(name=name, model=model, endpoint_extra=endpoint_extra,
                             priors=priors, chains=chains, ta=ta))
    return p


@pytest.mark.parametrize("kwargs, key", [
    (dict(model="no_such_model"), "[fit] model"),
    (dict(endpoint_extra="dvid = 2"), "endpoints[0].dvid"),
    (dict(priors="CLEARANCE = { median = 5, sd = 0.5 }"), "[priors] CLEARANCE"),
    (dict(chains=0), "[sampler].chains"),
    (dict(ta=1.5), "[sampler].target_accept"),
    (dict(priors="CL = { median = -5 }"), "[priors] CL.median"),
])
def test_malformed_spec_fails_before_sampling(tmp_path, capsys, kwargs, key):
    spec = _spec(tmp_path, data=_data(3), **kwargs)
    rc = main(["fit", str(spec)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("pkpd: error: ")
    assert str(spec) in err and key in err
    assert not (tmp_path / "small").exists()



@pytest.mark.parametrize("extra, key", [
    ('mass_matrix = "dense"', "[sampler].mass_matrix"),
    ('engine = "pymc"\nmass_matrix = "low-rank"', "[sampler].mass_matrix"),
    ('mass_matrix = "low-rank"\nlow_rank_cutoff = 0.5', "[sampler].low_rank_cutoff"),
    ('low_rank_cutoff = 3', "[sampler].low_rank_cutoff"),  # needs the low-rank matrix
])
def test_bad_mass_matrix_fails_before_sampling(tmp_path, capsys, extra, key):
    spec = _spec(tmp_path, data=_data(3))
    spec.write_text(spec.read_text() + extra + "\n")  # [sampler] is the last section
    assert main(["fit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and key in err
    assert not (tmp_path / "small").exists()

@pytest.fixture(scope="module")
def cli_fit(tmp_path_factory):
    """One real fit through the CLI (2 chains × 300 draws with nutpie)."""
    tmp = tmp_path_factory.mktemp("fit")
    spec = _spec(tmp)
    rc = main(["fit", str(spec), "--no-progress"])
    assert rc == 0
    return tmp / "small"


@pytest.mark.slow
def test_fit_writes_the_results_folder(cli_fit):
    names = {p.name for p in cli_fit.iterdir()}
    assert {"posterior.nc", "summary.csv", "diagnostics.json", "predictions.csv", "gof.png",
            "vpc.png", "individual_fits.png", "trace_rank.png", "spec.toml"} <= names
    assert not [p for p in cli_fit.parent.iterdir() if p.name.startswith(".small")]
    diag = json.loads((cli_fit / "diagnostics.json").read_text())
    assert diag["divergences"] == 0
    assert diag["max_r_hat"] < 1.05  # 2 × 300 draws: R-hat's own Monte Carlo noise ~0.01
    assert diag["wall_time_s"] > 0 and np.isfinite(diag["elpd_loo"])
    pred = pd.read_csv(cli_fit / "predictions.csv")
    assert {"ID", "TIME", "TAD", "DV", "PRED", "IPRED", "CWRES", "NPDE", "IWRES"} <= set(pred)
    np.testing.assert_array_equal(pred["TAD"], pred["TIME"])  # one dose at time 0
    ok = pred["CENS"] == 0
    # a correctly specified model: NPDE ~ N(0, 1); with ~190 records the mean has SD ~0.07,
    # the SD ~0.05 (plus Monte Carlo error of 300 replicates), so ±0.3 is ~4 SE
    assert abs(pred.loc[ok, "NPDE"].mean()) < 0.3
    assert 0.7 < pred.loc[ok, "NPDE"].std() < 1.3
    assert abs(np.median(pred.loc[ok, "IWRES"])) < 0.3


@pytest.mark.slow
def test_fit_recovers_the_simulation_truth(cli_fit):
    s = pd.read_csv(cli_fit / "summary.csv").set_index("parameter")
    for k, v in TRUTH.items():
        assert s.loc[k, "q2.5"] < v < s.loc[k, "q97.5"], k
        assert abs(s.loc[k, "median"] / v - 1) < 0.25, k
    assert 0.10 < s.loc["sigma_prop_CP", "median"] < 0.20  # truth 0.15
    assert s.loc["omega_CL", "q2.5"] < 0.294 < s.loc["omega_CL", "q97.5"]  # CV 30 %
    assert 20 < s.loc["omega_CL", "iiv_cv_percent"] < 45
    assert 0 <= s.loc["omega_CL", "shrinkage_percent"] < 40


@pytest.mark.slow
def test_blq_records_use_the_m3_likelihood(cli_fit):
    """A censored record's pointwise log-likelihood is log Φ((LLOQ − f)/(σ·f))."""
    import arviz as az

    from pkpd.likelihood import LinearPredictor

    idata = az.from_netcdf(cli_fit / "posterior.nc")
    data = pd.read_csv(cli_fit.parent / "data.csv", na_values=".")
    obs = data[data["EVID"] == 0].reset_index(drop=True)
    cens = np.flatnonzero(obs["CENS"].to_numpy() == 1)
    assert len(cens) > 3
    post = idata.posterior.isel(chain=0, draw=5)
    lp = LinearPredictor(load_model("pk_1cmt_oral"), data)
    eta = post["eta"].values
    ind = {k: float(post[k]) * np.exp(eta[:, j]) if k in ("CL", "V", "KA") else float(post[k])
           for j, k in enumerate(["CL", "V", "KA"])}
    f = lp.compile()(ind)["CP"]
    sd = float(post["sigma_prop_CP"]) * f
    expect = norm.logcdf((LLOQ - f[cens]) / sd[cens])
    got = idata.log_likelihood["obs_CP"].isel(chain=0, draw=5).values[cens]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-12)  # far tails: ~1e-54
    unc = np.flatnonzero(obs["CENS"].to_numpy() == 0)[:5]
    expect_u = norm.logpdf(obs["DV"].to_numpy()[unc], f[unc], sd[unc])
    np.testing.assert_allclose(idata.log_likelihood["obs_CP"].isel(chain=0, draw=5)
                               .values[unc], expect_u, rtol=1e-6)


@pytest.mark.slow
def test_failed_save_leaves_no_folder_and_keeps_the_old_one(cli_fit, tmp_path):
    """Writing results into a temporary folder that is renamed at the end: an error part-way
    (here: an endpoint whose output cannot be predicted) leaves the target as it was."""
    import dataclasses

    import arviz as az

    from pkpd.fitting import Endpoint, FitResult, load_spec

    spec = load_spec(cli_fit.parent / "small.toml")
    from pkpd.fitting import build

    b = build(spec.model, spec.data, spec.endpoints)
    res = FitResult(spec.model, spec.data, b, az.from_netcdf(cli_fit / "posterior.nc"),
                    spec.sampler, 1.0)
    target = tmp_path / "out"
    bad = dataclasses.replace(b, endpoints=[Endpoint("NOPE")])
    res.built = bad
    with pytest.raises(KeyError):
        res.save(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old.txt").write_text("previous results")
    with pytest.raises(KeyError):
        res.save(target)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# NONMEM 7 FOCE-I estimates and standard errors for pheno (pharmpy-core 2.1.1,
# pharmpy/internals/example_models/pheno.ext: rows -1000000000 and -1000000001; OFV 586.276)
PHENO_NONMEM = {"CL": (4.69555e-3, 2.09967e-4), "V": (0.984258, 0.0268946),
                "APGR_V": (0.15892, 0.0837555)}
PHENO_OMEGA2 = {"CL": 0.0293508, "V": 0.027906}
PHENO_SIGMA2 = 0.013241


@pytest.mark.slow
def test_pheno_posterior_medians_match_nonmem(tmp_path):
    """The real pheno data (59 neonates, 155 concentrations) fitted with weak priors: the
    posterior medians agree with NONMEM's FOCE-I estimates within 1.5 NONMEM standard errors
    for the THETAs, and within 35 % for the SDs of η and ε (their posteriors are skewed and
    FOCE-I is approximate; the 2 × 400 draws add ~3 % Monte Carlo error)."""
    from pkpd.fitting import REPO_FITS, fit_spec, load_spec

    spec = load_spec(REPO_FITS / "pheno.toml")
    import dataclasses

    spec = dataclasses.replace(spec, sampler=dataclasses.replace(
        spec.sampler, chains=2, draws=400, tune=400), output=tmp_path / "pheno")
    res = fit_spec(spec, progress=False, write=False)
    s = res.summary().set_index("parameter")
    for k, (est, se) in PHENO_NONMEM.items():
        assert abs(s.loc[k, "median"] - est) < 1.5 * se, (k, s.loc[k, "median"], est)
    for k, w2 in PHENO_OMEGA2.items():
        assert abs(s.loc[f"omega_{k}", "median"] / np.sqrt(w2) - 1) < 0.35, k
    assert abs(s.loc["sigma_prop_CP", "median"] / np.sqrt(PHENO_SIGMA2) - 1) < 0.35
    # η-shrinkage (SD) from the posterior-mean EBEs vs NONMEM's ETASHRINKSD 47.6 % and 13.6 %
    # (pheno.lst): within 12 percentage points
    assert abs(s.loc["omega_CL", "shrinkage_percent"] - 47.6) < 12
    assert abs(s.loc["omega_V", "shrinkage_percent"] - 13.6) < 12
    assert res.diagnostics()["divergences"] == 0


def test_mixed_parameterization_is_the_same_posterior():
    """η of some parameters sampled directly and the rest as z: the same posterior as the
    non-centred form, up to the Jacobian |dη/dz| = ω per centred η (S subjects each)."""
    from pkpd.fitting import Endpoint, FitSpecError, build

    m, df = load_model("pk_1cmt_oral"), _data(4)
    ep = [Endpoint("CP")]
    nc = build(m, df, ep).pm_model
    mixed = build(m, df, ep, centred=["KA"]).pm_model
    names = list(nc.coords["eta_param"])
    j = names.index("KA")
    rng = np.random.default_rng(0)
    p = {k: np.asarray(v) + 0.1 * rng.standard_normal(np.shape(v))
         for k, v in nc.initial_point().items()}
    om = np.exp(p["omega_log__"])
    q = {k: v for k, v in p.items() if k != "z"}
    q["eta_c"] = p["z"][:, [j]] * om[j]
    q["z"] = np.delete(p["z"], j, axis=1)
    assert list(mixed.coords["eta_centred"]) == ["KA"]
    lp_nc = nc.compile_logp()(p)
    lp_mixed = mixed.compile_logp()(q)
    assert lp_mixed == pytest.approx(lp_nc - 4 * np.log(om[j]), rel=1e-10)
    (eta,) = mixed.replace_rvs_by_values([mixed["eta"]])
    eta = mixed.compile_fn(eta, inputs=mixed.value_vars, on_unused_input="ignore")(q)
    np.testing.assert_allclose(eta, p["z"] * om, rtol=1e-12)
    with pytest.raises(FitSpecError, match="centred: VV not a parameter with IIV"):
        build(m, df, ep, centred=["VV"])
    with pytest.raises(FitSpecError, match="iiv = 'diagonal'"):
        build(m, df, ep, centred=["KA"], iiv="block")


def test_spec_centres_the_named_parameters(tmp_path):
    from pkpd.fitting import FitSpecError, load_spec

    spec = _spec(tmp_path, data=_data(3))
    text = spec.read_text()
    spec.write_text(text.replace('data = "data.csv"',
                                 'data = "data.csv"\nparameterization = ["KA"]'))
    assert load_spec(spec).centred == ("KA",)
    spec.write_text(text.replace('data = "data.csv"',
                                 'data = "data.csv"\nparameterization = ["KA", "VV"]'))
    with pytest.raises(FitSpecError, match=r"\[fit\] parameterization: VV: not a parameter"):
        load_spec(spec)



def _assert_same_medians(folder, res) -> None:
    """Every population median of ``res`` within 4 Monte Carlo SEs of the difference from
    the saved fit in ``folder`` (SE of a median ≈ 1.25·sd/√ESS, sd from the 95 % CrI)."""
    a = pd.read_csv(folder / "summary.csv").set_index("parameter")
    b = res.summary().set_index("parameter")
    sd = (a["q97.5"] - a["q2.5"]) / 3.92
    se = 1.25 * sd * np.sqrt(1 / a["ess_bulk"] + 1 / b["ess_bulk"])
    z = ((a["median"] - b["median"]).abs() / se).dropna()
    assert len(z) >= 5 and z.max() < 4, z.sort_values().tail(3)


@pytest.mark.slow
def test_low_rank_mass_matrix_gives_the_same_posterior(cli_fit, tmp_path):
    """nutpie's low-rank mass matrix (``mass_matrix = "low-rank"``) samples the same posterior
    as the diagonal one of ``cli_fit`` (same spec and data): every median agrees within 4
    Monte Carlo SEs of the difference (SE of a median ≈ 1.25·sd/√ESS, sd from the 95 % CrI)."""
    from pkpd.fitting import fit_spec, load_spec

    spec = cli_fit.parent / "small.toml"
    low = tmp_path / "low.toml"
    low.write_text(spec.read_text().replace('name = "small"', 'name = "low"')
                   + 'mass_matrix = "low-rank"\n')
    (tmp_path / "data.csv").write_text((cli_fit.parent / "data.csv").read_text())
    res = fit_spec(load_spec(low), progress=False, write=False)
    d = res.diagnostics()
    assert d["mass_matrix"] == "low-rank" and d["divergences"] == 0
    _assert_same_medians(cli_fit, res)


@pytest.mark.slow
def test_auto_centring_gives_the_same_posterior(cli_fit, tmp_path):
    """``parameterization = "auto"`` (λ per subject and parameter from the EBE, chains started
    there) samples the same posterior as the non-centred ``cli_fit``: medians within 4 Monte
    Carlo SEs of the difference (as above); the EBE's λ are in [0, 1] and the rich-data
    parameters (CL, V: 7 samples each) are mostly centred."""
    from pkpd.fitting import fit_spec, load_spec

    spec = cli_fit.parent / "small.toml"
    auto = tmp_path / "auto.toml"
    auto.write_text(spec.read_text().replace('name = "small"', 'name = "auto"\n'
                                             'parameterization = "auto"'))
    (tmp_path / "data.csv").write_text((cli_fit.parent / "data.csv").read_text())
    s = load_spec(auto)
    assert s.centred == "auto"
    res = fit_spec(s, progress=False, write=False)
    c = res.built.centring
    names = res.built.iiv
    assert c.converged and c.lam.shape == (30, len(names))
    assert np.all((c.lam >= 0) & (c.lam <= 1))
    assert np.median(c.lam[:, names.index("CL")]) > 0.5
    np.testing.assert_array_equal(res.built.pm_model["eta_lambda"].get_value(), c.lam)
    d = res.diagnostics()
    assert d["divergences"] == 0
    # the pointwise log-likelihood (from the model with the EBE's λ) gives the non-centred
    # fit's PSIS-LOO within Monte Carlo error (≈ 1 for 600 draws; with λ = 0 left in the
    # model, η would be off by a factor ω and elpd by hundreds)
    d0 = json.loads((cli_fit / "diagnostics.json").read_text())
    assert abs(d["elpd_loo"] - d0["elpd_loo"]) < 3
    _assert_same_medians(cli_fit, res)


@pytest.mark.parametrize("fit_extra, sampler_extra, key", [
    ('parameterization = "partly"', "", "[fit] parameterization"),
    ('likelihood = "fast"', "", "[fit] likelihood"),
    ("", 'backend = "cuda"', "[sampler].backend"),
    ("", 'engine = "pymc"\nbackend = "jax"', "[sampler].backend"),
])
def test_bad_parameterization_likelihood_backend(tmp_path, fit_extra, sampler_extra, key):
    from pkpd.fitting import FitSpecError, load_spec

    spec = _spec(tmp_path, data=_data(3))
    spec.write_text(spec.read_text().replace('data = "data.csv"',
                                             f'data = "data.csv"\n{fit_extra}')
                    + sampler_extra + "\n")
    with pytest.raises(FitSpecError) as err:
        load_spec(spec)
    assert str(spec) in str(err.value) and key in str(err.value)


@pytest.mark.slow
def test_jax_backend_has_the_same_log_density_and_samples_it():
    """nutpie's JAX backend (``backend = "jax"``): log density and gradient equal PyTensor's
    C build at random points (1e-10), also with ``centred="auto"`` (λ replaced as data); a
    short fit puts the population CL within 3 posterior SDs of the truth. BLQ records are
    refused before sampling (PyTensor's JAX backend has no erfcx for the M3 likelihood)."""
    from pkpd.fitting import Endpoint, FitSpecError, build, compile_nutpie, fit

    m, df = load_model("pk_1cmt_oral"), _data(12).drop(columns="CENS")
    for centred in (False, "auto"):
        b = build(m, df, [Endpoint("CP")], centred=centred)
        c = compile_nutpie(b, backend="jax")
        pmm = b.pm_model
        if centred == "auto":  # the reference at the λ the EBE chose
            pmm.set_data("eta_lambda", b.centring.lam)
        else:  # nutpie's JAX build freezes the model, which reorders its variables
            from pymc.model.transform.optimization import freeze_dims_and_data

            pmm = freeze_dims_and_data(pmm)
        ref = pmm.logp_dlogp_function(ravel_inputs=True)
        ref.set_extra_values({})
        f = c._make_logp_func()
        rng = np.random.default_rng(0)
        x0 = np.asarray(c._make_initial_points(0))
        for _ in range(3):
            x = x0 + 0.05 * rng.standard_normal(x0.shape)
            v, g = f(x, **c._shared_data)
            v_ref, g_ref = ref(x)
            assert v == pytest.approx(float(v_ref), rel=1e-10)
            np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-8)
    res = fit(m, df, backend="jax", chains=2, draws=150, tune=150, progress=False,
              posterior_predictive=False)
    cl = res.idata.posterior["CL"].values.ravel()
    assert abs(np.median(cl) - TRUTH["CL"]) < 3 * cl.std()
    with pytest.raises(FitSpecError, match="backend: 'jax' cannot fit BLQ records"):
        fit(m, _data(12), backend="jax", chains=1, draws=10, tune=10, progress=False)


def test_vpc_bins_pk_by_time_after_dose_under_repeated_dosing():
    """The pcVPC's x axis: time after dose for a PK output when subjects take repeated
    doses (ADDL), time otherwise (single dose, or an output beyond the PK)."""
    from types import SimpleNamespace

    from pkpd.dataset import from_frame
    from pkpd.fitting import Endpoint, _vpc_time

    rows = []
    for i in (1, 2):
        rows.append(dict(ID=i, TIME=0.0, EVID=1, AMT=40.0, CMT=1, II=168.0, ADDL=3))
        rows += [dict(ID=i, TIME=t, EVID=0, AMT=0.0, CMT=2, II=0.0, ADDL=0)
                 for t in (2.0, 170.0, 528.0)]
    ds = from_frame(pd.DataFrame(rows))
    obs = np.flatnonzero(ds.data["EVID"].to_numpy() == 0)
    res = SimpleNamespace(model=load_model("smm_mspike"), dataset=ds)
    t, label = _vpc_time(res, Endpoint("CP"), obs)
    np.testing.assert_allclose(t, [2.0, 2.0, 24.0] * 2)
    assert label == "time after dose (h)"
    t, label = _vpc_time(res, Endpoint("MSPIKE"), obs)
    np.testing.assert_allclose(t, [2.0, 170.0, 528.0] * 2)
    assert label == "time (h)"
    single = from_frame(pd.DataFrame(rows).assign(ADDL=0))
    assert _vpc_time(SimpleNamespace(model=load_model("pk_1cmt_oral"), dataset=single),
                     Endpoint("CP"), obs)[1] == "time (h)"
