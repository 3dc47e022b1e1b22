"""Sequential PPP&D fits (Zhang, Beal & Sheiner 2003): population PK parameters (θ, ω,
residual error) fixed at an earlier fit's posterior medians, the PK data kept in the
likelihood, so each subject's PK η are re-estimated with the PD (``fit(population=...)``,
``[fit] population``, ``read_population``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkpd import load_model, simulate
from pkpd.fitting import Endpoint, FitSpecError, Prior, build, fit, load_spec, read_population
from pkpd.simulation import sample_etas

# 1-cmt oral PK (pk_1cmt_oral's parameters) with a direct Emax effect; closed form.
EMAX_TOML = """
[model]
name = "pk_1cmt_oral_emax"
[parameters]
CL   = { value = 5.0, unit = "L/h", iiv_cv = 30 }
V    = { value = 50.0, unit = "L", iiv_cv = 25 }
KA   = { value = 1.0, unit = "1/h", iiv_cv = 40 }
E0   = { value = 10.0, unit = "-", iiv_cv = 20 }
EMAX = { value = 20.0, unit = "-" }
EC50 = { value = 1.0, unit = "mg/L" }
[compartments]
DEPOT   = { cmt = 1, unit = "mg" }
CENTRAL = { cmt = 2, unit = "mg" }
[odes]
DEPOT   = "-KA*DEPOT"
CENTRAL = "KA*DEPOT - CL/V*CENTRAL"
[outputs]
CP  = { expr = "CENTRAL/V", unit = "mg/L" }
EFF = { expr = "E0 + EMAX*(CENTRAL/V)/(EC50 + CENTRAL/V)", unit = "-" }
"""
# simulation truth of the PD: away from the model file's values (where the chains start)
TRUTH = {"E0": 12.0, "EMAX": 25.0, "EC50": 1.5}
SAMPLER = dict(chains=2, draws=300, tune=300, progress=False, posterior_predictive=False)


def _design(n: int, seed: int, tmp) -> tuple[pd.DataFrame, dict[str, np.ndarray], object]:
    """n subjects, 50 or 300 mg oral (alternating), CP (DVID 1, 10 % proportional error) and
    EFF (DVID 2, additive SD 1) at 0.5, 1, 3, 6, 12, 24 h; returns data, true η, model."""
    path = tmp / "pk_1cmt_oral_emax.toml"
    path.write_text(EMAX_TOML)
    model = load_model(path)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        rows.append(dict(ID=i, TIME=0.0, EVID=1, AMT=(50.0, 300.0)[i % 2], CMT=1, MDV=1,
                         DV=np.nan, DVID=1))
        rows += [dict(ID=i, TIME=float(t), EVID=0, AMT=0.0, CMT=2, MDV=0, DV=np.nan, DVID=d)
                 for t in (0.5, 1, 3, 6, 12, 24) for d in (1, 2)]
    df = pd.DataFrame(rows)
    eta = sample_etas(model, n, rng)
    sim = simulate(model, df, params=TRUTH, eta=eta)
    e = rng.standard_normal(len(df))
    df["DV"] = np.where(df["EVID"] == 1, np.nan,
                        np.where(df["DVID"] == 1, sim["CP"] * (1 + 0.1 * e), sim["EFF"] + e))
    return df, eta, model


def _eta_mean(res, name: str) -> np.ndarray:
    j = res.built.iiv.index(name)
    return res.idata.posterior["eta"].mean(dim=("chain", "draw")).values[:, j]


@pytest.fixture(scope="module")
def step1(tmp_path_factory):
    """Step 1: the population PK fit (pk_1cmt_oral on CP only), saved as a fit folder."""
    tmp = tmp_path_factory.mktemp("ppp")
    df, eta, model = _design(20, 11, tmp)
    res = fit("pk_1cmt_oral", df, [Endpoint("CP", dvid=1)], seed=3, **SAMPLER)
    return df, eta, model, res, res.save(tmp / "step1"), tmp


def test_population_values_are_fixed_and_etas_still_vary(tmp_path):
    """θ_CL, θ_V, ω_CL, ω_V and σ_CP fixed at given values (the truth): they are not sampled
    (CL, V absent from the posterior, ω and σ constant at the given value, out of the
    summary), while η_CL of 12 subjects with 6 samples each still vary and track the true η
    (ω_CL = 0.29, 10 % error: little shrinkage); θ_KA and ω_KA are estimated."""
    df, eta, _ = _design(12, 5, tmp_path)
    om = {k: float(np.sqrt(load_model("pk_1cmt_oral").parameters[k].omega2))
          for k in ("CL", "V")}
    given = {"CL": 5.0, "V": 50.0, "omega_CL": om["CL"], "omega_V": om["V"],
             "sigma_prop_CP": 0.1}  # "CP" (no DVID) applies to the endpoint CP_1
    res = fit("pk_1cmt_oral", df, [Endpoint("CP", dvid=1)], population=given, seed=2,
              **SAMPLER)
    post = res.idata.posterior
    assert res.built.estimated == ["KA"]
    assert "CL" not in post and "V" not in post
    assert res.built.fixed["CL"] == 5.0 and res.built.fixed["V"] == 50.0
    assert np.all(post["omega_CL"].values == om["CL"])
    assert np.all(post["omega_V"].values == om["V"])
    assert np.all(post["sigma_prop_CP_1"].values == 0.1)
    assert post["omega_KA"].values.std() > 0  # estimated
    assert set(res.summary()["parameter"]) == {"KA", "omega_KA"}
    assert res.diagnostics()["fixed_population"] == {
        "CL": 5.0, "V": 50.0, "omega_CL": om["CL"], "omega_V": om["V"], "sigma_prop_CP_1": 0.1}
    assert res.built.iiv == ["CL", "V", "KA"]
    eta_cl = _eta_mean(res, "CL")
    assert np.std(eta_cl, ddof=1) > 0.5 * om["CL"]
    assert np.corrcoef(eta_cl, eta["CL"])[0, 1] > 0.8
    # individual parameters use the fixed θ with each subject's η
    ind = res.individual_parameters()
    np.testing.assert_allclose(np.log(ind["CL"] / 5.0), eta_cl, atol=0.05)


def test_ppp_and_d_fit_recovers_the_pd(step1):
    """Step 1's θ, ω and σ_CP (posterior medians from the saved folder) fixed exactly in the
    PK/PD fit of CP and EFF; the PK η are re-estimated from the PK data (which stay in the
    likelihood) and EMAX, EC50, E0 are recovered. Tolerance: 20 subjects × 6 EFF values
    with SD 1, concentrations from ~0.05 to 3 × EC50 (50 and 300 mg) give posterior CVs of
    ~5.5 % (E0, limited by its 20 % IIV), 3 % (EMAX) and 9 % (EC50) (seeds 11 and 12); each
    median within 3 posterior SDs of the truth and within 15 %, 10 %, 25 % of it."""
    df, eta, model, res1, folder, tmp = step1
    pop = read_population(folder)
    s1 = res1.summary().set_index("parameter")
    assert set(pop) == set(s1.index) == {"CL", "V", "KA", "omega_CL", "omega_V",
                                         "omega_KA", "sigma_prop_CP_1"}
    for k, v in pop.items():  # full precision: medians of posterior.nc
        assert v == float(np.median(res1.idata.posterior[k].values))
    # the same folder named by a spec
    df.to_csv(tmp / "data.csv", index=False, na_rep=".")
    (tmp / "step2.toml").write_text(
        '[fit]\nname = "step2"\nmodel = "pk_1cmt_oral_emax.toml"\ndata = "data.csv"\n'
        'population = "step1"\n[[endpoints]]\noutput = "CP"\ndvid = 1\n'
        '[[endpoints]]\noutput = "EFF"\nerror = "additive"\ndvid = 2\n')
    assert load_spec(tmp / "step2.toml").population == pop

    res = fit(model, df, [Endpoint("CP", dvid=1), Endpoint("EFF", "additive", dvid=2)],
              population=folder, seed=4, **SAMPLER)
    b, post = res.built, res.idata.posterior
    assert b.estimated == ["E0", "EMAX", "EC50"]
    for k in ("CL", "V", "KA"):
        assert k not in post and b.fixed[k] == pop[k]
    for k in ("omega_CL", "omega_V", "omega_KA", "sigma_prop_CP_1"):
        assert np.all(post[k].values == pop[k])
    assert set(b.obs) == {"CP_1", "EFF_2"}  # the PK data are in the likelihood
    # each subject's PK η re-estimated: they track the truth (as in step 1)
    for k in ("CL", "V"):
        assert np.corrcoef(_eta_mean(res, k), eta[k])[0, 1] > 0.8
    s2 = res.summary().set_index("parameter")
    assert set(s2.index) == {"E0", "EMAX", "EC50", "omega_E0", "sigma_add_EFF_2"}
    for k, rel in (("E0", 0.15), ("EMAX", 0.1), ("EC50", 0.25)):
        med, true = s2.loc[k, "median"], TRUTH[k]
        sd = s2.loc[k, "posterior_cv_percent"] / 100 * med
        assert abs(med - true) < 3 * sd, (k, s2.loc[k].to_dict())
        assert med == pytest.approx(true, rel=rel)
    assert s2.loc["sigma_add_EFF_2", "median"] == pytest.approx(1.0, rel=0.2)


def test_population_errors(tmp_path):
    """Errors name the source (file) and the parameter; all raised before sampling."""
    df, _, _ = _design(4, 1, tmp_path)
    m = load_model("pk_1cmt_oral")
    cp = [Endpoint("CP", dvid=1)]
    with pytest.raises(FitSpecError, match="population: 'VMAX' is not a parameter of "
                                           "pk_1cmt_oral"):
        build(m, df, cp, population={"VMAX": 1.0})
    ind = pd.DataFrame({"ID": [1, 2, 3, 4], "CL": [4.0, 5.0, 6.0, 7.0]})
    with pytest.raises(FitSpecError, match="CL: fixed per subject by the individual "
                                           "parameters and by the population parameters"):
        build(m, df, cp, individual=ind, population={"CL": 5.0})
    with pytest.raises(FitSpecError, match="omega_CL: CL is fixed per subject"):
        build(m, df, cp, individual=ind, population={"omega_CL": 0.3})
    with pytest.raises(FitSpecError, match=r"\[priors\] CL: fixed by the population"):
        build(m, df, cp, priors={"CL": Prior("lognormal", 5.0, 0.5)}, population={"CL": 5.0})
    with pytest.raises(FitSpecError, match=r"\[priors.omega\] CL: ω fixed by the population"):
        build(m, df, cp, omega_scale={"CL": 0.5}, population={"omega_CL": 0.3})
    with pytest.raises(FitSpecError, match="sigma_prop_EFF: no endpoint EFF"):
        build(m, df, cp, population={"sigma_prop_EFF": 0.1})
    with pytest.raises(FitSpecError, match="sigma_add_CP: endpoint CP_1 has a.n. "
                                           "proportional residual error"):
        build(m, df, cp, population={"sigma_add_CP": 0.1})
    with pytest.raises(FitSpecError, match=r"endpoints\[0\].sigma_prop: a prior on a "
                                           "residual error fixed"):
        build(m, df, [Endpoint("CP", dvid=1, sigma_prop=0.3)],
              population={"sigma_prop_CP_1": 0.1})
    with pytest.raises(FitSpecError, match="omega_V: expected ω > 0"):
        build(m, df, cp, population={"omega_V": 0.0})
    with pytest.raises(FitSpecError, match="KA: expected a finite number"):
        build(m, df, cp, population={"KA": float("nan")})
    with pytest.raises(FitSpecError, match="omega_CL: a fixed ω needs iiv = 'diagonal'"):
        build(m, df, cp, iiv="block", population={"omega_CL": 0.3})
    # fit folders: missing files, a parameter of another model, priors on fixed ones
    (tmp_path / "empty").mkdir()
    with pytest.raises(FitSpecError, match="empty: no population parameters .expected a fit "
                                           "folder with summary.csv and posterior.nc"):
        read_population(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    pd.DataFrame({"parameter": ["CL", "VMAX"], "median": [5.0, 2.0]}).to_csv(
        tmp_path / "other" / "summary.csv", index=False)
    assert read_population(tmp_path / "other") == {"CL": 5.0, "VMAX": 2.0}  # no posterior.nc
    with pytest.raises(FitSpecError, match=r"population .*other/summary.csv: 'VMAX' is not "
                                           "a parameter of pk_1cmt_oral"):
        fit(m, df, cp, population=tmp_path / "other", **SAMPLER)
    df.to_csv(tmp_path / "data.csv", index=False, na_rep=".")
    spec = ('[fit]\nname = "s"\nmodel = "pk_1cmt_oral"\ndata = "data.csv"\npopulation = "{}"\n'
            '[[endpoints]]\noutput = "CP"\ndvid = 1\n')
    (tmp_path / "a.toml").write_text(spec.format("missing"))
    with pytest.raises(FitSpecError, match=r"a.toml: \[fit\] population: .*missing: no "
                                           "population parameters"):
        load_spec(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(spec.format("other"))
    with pytest.raises(FitSpecError, match=r"b.toml: population .*other/summary.csv: 'VMAX'"):
        load_spec(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text(spec.format("step1") + "[priors]\nCL = { median = 4 }\n")
    (tmp_path / "step1").mkdir()
    pd.DataFrame({"parameter": ["CL", "omega_CL"], "median": [5.0, 0.3]}).to_csv(
        tmp_path / "step1" / "summary.csv", index=False)
    with pytest.raises(FitSpecError, match=r"c.toml: \[priors\] CL: fixed by the population "
                                           r"parameters \(.*step1/summary.csv\)"):
        load_spec(tmp_path / "c.toml")
    # a posterior.nc that lacks a parameter listed in summary.csv
    import arviz as az

    az.from_dict(posterior={"CL": np.full((1, 4), 5.0)}).to_netcdf(
        str(tmp_path / "step1" / "posterior.nc"))
    with pytest.raises(FitSpecError, match="posterior.nc: no draws of omega_CL .listed in "
                                           "summary.csv"):
        read_population(tmp_path / "step1")
