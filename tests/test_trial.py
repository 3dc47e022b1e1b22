"""`pkpd trial`: dose ladders, reproducibility, outputs and one-line errors (small n)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkpd.cli import main
from pkpd.regimen import RegimenError
from pkpd.trial import dose_ladder, run_trial


def test_label_dose_ladders():
    assert dose_ladder("100 mg QW") == [(100.0, (0.0,)), (80.0, (0.0,)), (60.0, (0.0,)),
                                        (40.0, (0.0,))]
    assert dose_ladder("40 mg QW") == [(40.0, (0.0,))]
    assert dose_ladder("80 mg BIW") == [(80.0, (0.0, 48.0)), (100.0, (0.0,)), (80.0, (0.0,)),
                                        (60.0, (0.0,))]
    assert dose_ladder("70 mg QW") == [(70.0, (0.0,)), (60.0, (0.0,)), (40.0, (0.0,))]
    assert dose_ladder("none") == []
    with pytest.raises(RegimenError, match="dose modification is defined for"):
        dose_ladder("60 mg QD")
    with pytest.raises(RegimenError, match="no 'for'"):
        dose_ladder("40 mg QW for 4 weeks")


@pytest.fixture(scope="module")
def rrmm_biw():
    return run_trial("80 mg BIW", n=24, years=0.25, seed=5, population="rrmm")


def test_holds_lower_dose_intensity_and_columns(rrmm_biw):
    p = rrmm_biw.patients
    assert list(p.columns) == [
        "ID", "RISK", "PROGRESSED", "TTP_DAYS", "PFS_EVENT", "PFS_DAYS", "MSPIKE_CHANGE_1Y",
        "SFLC_CHANGE_1Y", "SRE_1Y", "PLT_GRADE_MAX", "NAUSEA_G3", "FATIGUE_G3", "APPETITE_G3",
        "HYPONATREMIA_G3", "DOSE_INTENSITY", "XPO1_INH_MEAN", "REDUCTION_DAYS", "BIOCHEM_PROG",
        "BIOCHEM_PROG_DAYS"]
    assert set(p["RISK"]) <= {"intermediate", "high"} and len(p) == 24
    # grade 4 platelets ⇒ a hold ⇒ less than the planned dose; others get all of it
    g4 = p["PLT_GRADE_MAX"] == 4
    assert g4.any() and (p.loc[g4, "DOSE_INTENSITY"] < 1).all()
    assert (p.loc[p["PLT_GRADE_MAX"] < 4, "DOSE_INTENSITY"] == 1).all()
    # treatment lowers the M-spike in most patients (clone sensitivity varies, CV 100 %)
    assert (p["MSPIKE_CHANGE_1Y"] < 0).mean() >= 0.9 and p["MSPIKE_CHANGE_1Y"].median() < -0.1
    assert p["TTP_DAYS"].max() <= 0.25 * 52 * 7 + 1e-9


def test_observation_arm_has_no_drug_effects():
    res = run_trial("none", n=12, years=0.25, seed=2)
    p = res.patients
    assert (p["DOSE_INTENSITY"] == 0).all()
    assert res.platelets == pytest.approx(res.platelets[:, :1] * (res.platelets * 0 + 1))
    assert (p["MSPIKE_CHANGE_1Y"] > 0).all()  # untreated SMM grows


def test_cli_same_seed_identical_files(tmp_path, capsys):
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["trial", "--regimen", "40 mg QW", "--risk", "intermediate,high", "--n",
                     "10", "--years", "0.1", "--seed", "1", "--out", str(out)]) == 0
        outs.append(out)
    for name in ("patients.csv", "summary.csv"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert {f.name for f in outs[0].iterdir()} == {
        "patients.csv", "summary.csv", "km_progression.png", "mspike_bands.png",
        "platelets_bands.png"}
    summary = pd.read_csv(outs[0] / "summary.csv")
    assert {"RISK", "ENDPOINT", "N", "ESTIMATE", "LOWER", "UPPER"} == set(summary.columns)
    # the reference engine: the same patients, M-spike change within 1e-4
    ode = tmp_path / "ode"
    assert main(["trial", "--regimen", "40 mg QW", "--risk", "intermediate,high", "--n", "10",
                 "--years", "0.1", "--seed", "1", "--engine", "ode", "--out", str(ode)]) == 0
    a, b = (pd.read_csv(o / "patients.csv") for o in (outs[0], ode))
    assert (a["ID"] == b["ID"]).all()
    np.testing.assert_allclose(a["MSPIKE_CHANGE_1Y"], b["MSPIKE_CHANGE_1Y"], atol=1e-4)
    capsys.readouterr()


@pytest.mark.parametrize("args, expected", [
    (["--regimen", "40 mg QWX"], "unknown frequency 'QWX'"),
    (["--regimen", "40 mg QW", "--risk", "medium"], "--risk: unknown risk group 'medium'"),
    (["--regimen", "40 mg QW", "--n", "-3"], "--n must be >= 1, got -3"),
])
def test_cli_bad_inputs_one_line_exit_2_no_files(tmp_path, capsys, args, expected):
    out = tmp_path / "trial"
    assert main(["trial", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_unwritable_output(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["trial", "--regimen", "40 mg QW", "--n", "2", "--out", str(target)]) == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_theta_per_patient_equals_separate_runs():
    """Typical values per patient (parameter draws): each block equals a run of the model
    with those values, patient for patient (same seed ⇒ same patients and event times)."""
    from pkpd import load_model

    m = load_model("selinexor_smm")
    kkill = np.r_[np.full(4, 2.25e-4), np.full(4, 1.0e-3)]
    both = run_trial("100 mg QW", n=8, years=0.2, seed=9, theta={"KKILL": kkill}).patients
    alone = run_trial("100 mg QW", n=8, years=0.2, seed=9,
                      model=m.with_values(KKILL=1.0e-3)).patients
    base = run_trial("100 mg QW", n=8, years=0.2, seed=9).patients
    cols = ["MSPIKE_CHANGE_1Y", "SFLC_CHANGE_1Y", "XPO1_INH_MEAN"]
    np.testing.assert_allclose(both[cols].to_numpy()[4:], alone[cols].to_numpy()[4:],
                               rtol=1e-9)
    np.testing.assert_allclose(both[cols].to_numpy()[:4], base[cols].to_numpy()[:4],
                               rtol=1e-9)
    assert (both["MSPIKE_CHANGE_1Y"][4:] < base["MSPIKE_CHANGE_1Y"][4:]).all()
    with pytest.raises(ValueError, match="unknown parameter"):
        run_trial("100 mg QW", n=2, years=0.1, theta={"KILL": 1.0})
