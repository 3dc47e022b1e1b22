"""Sequential (IPP) fits: parameters fixed per subject from an earlier fit
(``fit(individual=...)``, ``[fit] individual``, ``FitResult.individual_parameters``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkpd import load_model, simulate
from pkpd.fitting import Endpoint, FitSpecError, build, fit, load_spec


def _data(n: int = 24, seed: int = 5) -> pd.DataFrame:
    """1-cmt oral (CL 5 L/h, V 50 L, KA 1/h, IIV from the file), 100 mg, 6 samples, 10 %
    proportional error."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        rows.append(dict(ID=i, TIME=0.0, EVID=1, AMT=100.0, CMT=1, MDV=1, DV=np.nan))
        rows += [dict(ID=i, TIME=float(t), EVID=0, AMT=0.0, CMT=2, MDV=0, DV=np.nan)
                 for t in (0.5, 1, 3, 6, 12, 24)]
    df = pd.DataFrame(rows)
    cp = simulate(load_model("pk_1cmt_oral"), df, iiv=True, seed=seed)["CP"].to_numpy()
    df["DV"] = np.where(df["EVID"] == 0, cp * (1 + 0.1 * rng.standard_normal(len(cp))),
                        np.nan)
    return df


@pytest.fixture(scope="module")
def pk_fit():
    return fit("pk_1cmt_oral", _data(), [Endpoint("CP")], chains=2, draws=300, tune=300,
               seed=3, progress=False, posterior_predictive=False)


def test_individual_parameters_are_fixed_per_subject():
    model, data = load_model("pk_1cmt_oral"), _data(6)
    table = pd.DataFrame({"ID": [6, 5, 4, 3, 2, 1], "CL": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    b = build(model, data, [Endpoint("CP")], individual=table)
    assert "CL" not in b.estimated and "CL" not in b.iiv
    assert set(b.predictor.vary if hasattr(b.predictor, "vary") else ()) <= {"V", "KA"}
    ind = b.predictor.individual_typical({"CL": 99.0})
    np.testing.assert_array_equal(ind["CL"], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    with pytest.raises(FitSpecError, match="'VMAX' is not a parameter"):
        build(model, data, [Endpoint("CP")], individual=table.assign(VMAX=1.0))
    with pytest.raises(FitSpecError, match="no row for ID 1"):
        build(model, data, [Endpoint("CP")], individual=table[table["ID"] != 1])
    with pytest.raises(FitSpecError, match="column CL, ID 3: expected a number"):
        build(model, data, [Endpoint("CP")],
              individual=table.assign(CL=[1.0, 2.0, 3.0, np.nan, 5.0, 6.0]))


def test_ipp_fit_uses_the_individual_estimates(pk_fit, tmp_path):
    """Step 1's individual CL (posterior medians) fixed in step 2: V and KA are re-estimated
    within 10 % of step 1's medians and 15 % of the truth (10 % error, 24 subjects: posterior
    SD of θ ≈ 5-10 %)."""
    ind = pk_fit.individual_parameters()
    assert list(ind.columns) == ["ID", *load_model("pk_1cmt_oral").parameters]
    truth_cv = 100 * np.sqrt(np.expm1(load_model("pk_1cmt_oral").parameters["CL"].omega2))
    cv = 100 * np.std(np.log(ind["CL"]), ddof=1)
    assert 0.4 * truth_cv < cv < 1.6 * truth_cv  # individual CLs spread like the IIV (shrunk)
    res = fit("pk_1cmt_oral", _data(), [Endpoint("CP")], individual=ind[["ID", "CL"]],
              chains=2, draws=300, tune=300, seed=4, progress=False,
              posterior_predictive=False)
    assert "CL" not in res.built.estimated
    s1 = pk_fit.summary().set_index("parameter")
    s2 = res.summary().set_index("parameter")
    for k, true in (("V", 50.0), ("KA", 1.0)):
        assert s2.loc[k, "median"] == pytest.approx(s1.loc[k, "median"], rel=0.1)
        assert s2.loc[k, "median"] == pytest.approx(true, rel=0.15)
    # the folder round trip: individual.csv, then a spec naming that folder
    folder = pk_fit.save(tmp_path / "step1")
    np.testing.assert_allclose(pd.read_csv(folder / "individual.csv")["CL"], ind["CL"],
                               rtol=1e-6)
    _data().to_csv(tmp_path / "data.csv", index=False, na_rep=".")
    (tmp_path / "step2.toml").write_text(
        '[fit]\nname = "step2"\nmodel = "pk_1cmt_oral"\ndata = "data.csv"\n'
        'individual = "step1"\n[[endpoints]]\noutput = "CP"\n[priors]\nCL = { median = 5 }\n')
    with pytest.raises(FitSpecError, match="CL: fixed per subject"):
        load_spec(tmp_path / "step2.toml")


def test_joint_smm_spec_builds_a_finite_differentiable_density():
    """fits/selinexor_smm_joint.toml (60 patients × 2 years, CP and M-spike): the spec loads,
    the density and its gradient are finite at the chains' start, and the predictions at
    the model file's values equal the simulator's."""
    from pathlib import Path

    from pkpd.fitting import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "fits" /
                     "selinexor_smm_joint.toml")
    b = build(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv)
    assert set(b.predictor.vary) == {"CL", "V2", "Q", "V3", "KA", "SEX_CL", "KG", "KKILL",
                                     "FRES"}
    point = b.pm_model.initial_point()
    assert np.isfinite(b.pm_model.compile_logp()(point))
    assert np.all(np.isfinite(b.pm_model.compile_dlogp()(point)))
    pred = b.predictor
    vals, _ = pred.evaluate(pred.individual_typical(), ["CP", "MSPIKE"], derivatives=False)
    sim = simulate(spec.model, spec.data.data)
    np.testing.assert_allclose(vals["MSPIKE"], sim["MSPIKE"].to_numpy()[pred.rows], rtol=1e-3)
    np.testing.assert_allclose(vals["CP"], sim["CP"].to_numpy()[pred.rows], rtol=1e-3,
                               atol=1e-3)


def test_pppd_spec_fixes_the_population_pk_and_keeps_the_pk_data(tmp_path):
    """fits/selinexor_smm_pppd.toml (step 2, PPP&D): with step 1 standing in as a CSV of the
    simulation's PK values, θ, ω and σ of the PK are fixed at them, the CP records stay in the
    likelihood and the PK η still vary (the density of this model and data is checked by the
    joint spec's test above)."""
    import json
    import shutil
    from pathlib import Path

    from pkpd.fitting import load_spec

    fits = Path(__file__).resolve().parent.parent / "fits"
    truth = json.loads((fits / "data" / "selinexor_smm_joint_truth.json").read_text())
    rows = [(k, v) for k, v in truth["theta"].items() if k in ("CL", "V2", "Q", "V3", "KA",
                                                                 "SEX_CL")]
    rows += [(f"omega_{k}", v) for k, v in truth["omega_sd"].items() if k in ("CL", "V2", "KA")]
    rows.append(("sigma_prop_CP", truth["sigma_prop_CP_1"]))
    (tmp_path / "data").mkdir()
    shutil.copy(fits / "data" / "selinexor_smm_joint.csv", tmp_path / "data")
    pd.DataFrame(rows, columns=["parameter", "median"]).to_csv(
        tmp_path / "selinexor_smm_pk", index=False)
    shutil.copy(fits / "selinexor_smm_pppd.toml", tmp_path)
    spec = load_spec(tmp_path / "selinexor_smm_pppd.toml")
    assert spec.population["CL"] == 16.0 and spec.population["sigma_prop_CP"] == rows[-1][1]
    assert [e.output for e in spec.endpoints] == ["CP", "MSPIKE"]
    b = build(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, population=spec.population)
    names = " ".join(v.name for v in b.pm_model.free_RVs)  # e.g. logit_KKILL, z
    assert all(k not in names for k in ("CL", "V2", "KA", "sigma_prop_CP"))
    assert all(k in names for k in ("KKILL", "FRES", "sigma_prop_MSPIKE"))
    assert set(b.predictor.vary) >= {"CL", "V2", "KA", "KKILL"}  # PK η re-estimated


def test_joint_net_spec_builds_the_periodic_auto_centred_model():
    """fits/selinexor_smm_joint_net.toml (benchmark c): the net-rate model with the periodic
    likelihood, partial centring from the EBE (λ as data), JAX and the low-rank mass matrix;
    η for CL, KG and KNET only (V2 and KA without IIV)."""
    from pathlib import Path

    from pkpd.fitting import load_spec
    from pkpd.periodic_likelihood import PeriodicPredictor

    spec = load_spec(Path(__file__).resolve().parent.parent / "fits" /
                     "selinexor_smm_joint_net.toml")
    assert (spec.likelihood, spec.centred) == ("periodic", "auto")
    assert (spec.sampler.backend, spec.sampler.mass_matrix) == ("jax", "low-rank")
    assert spec.sampler.low_rank_cutoff == 3
    b = build(spec.model, spec.data, spec.endpoints, priors=spec.priors,
              omega_scale=spec.omega_scale, iiv=spec.iiv, centred=spec.centred,
              likelihood=spec.likelihood)
    assert isinstance(b.predictor, PeriodicPredictor)
    assert b.iiv == ["CL", "KG", "KNET"] and b.auto_centring
    assert b.pm_model["eta_lambda"].get_value().shape == (60, 3)
    np.testing.assert_allclose(b.omega_start, [0.2077, 0.8326, 0.8326], rtol=1e-3)
