"""`pkpd demo` end to end on tiny settings: data set, PK and M-spike fit folders, report; bad
input."""

from __future__ import annotations

import pytest

from pkpd.cli import main
from pkpd.dataset import read_nonmem
from pkpd.demo import demo_dataset


def test_demo_dataset_is_nonmem_with_both_endpoints():
    df = demo_dataset(6, seed=3)
    obs = df[df["EVID"] == 0]
    assert set(obs["DVID"]) == {1, 2} and (obs["DV"] > 0).all()
    assert set(df.loc[df["EVID"] == 1, "AMT"]) == {40.0, 60.0, 100.0}
    # M-spike at week 0 is near the patient's baseline (5 % residual error)
    first = obs[obs["DVID"] == 2].groupby("ID").first()
    assert ((first["DV"] / first["MSPIKE0"] - 1).abs() < 0.25).all()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "6", "--draws", "3", "--patients", "12",
                 "--fit-draws", "60", "--pd-draws", "30", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report' / 'report.html'}" in printed
    ds = read_nonmem(out / "data" / "smm_trial.csv")
    assert len(ds) > 0 and {"DVID", "MSPIKE0"} <= set(ds.data.columns)
    for fit in ("fit_pk", "fit_pd"):
        for name in ("posterior.nc", "summary.csv", "diagnostics.json", "individual.csv"):
            assert (out / fit / name).is_file()
    # the M-spike fit estimated the kill rate with each patient's PK fixed (IPP)
    import pandas as pd
    summary = pd.read_csv(out / "fit_pd" / "summary.csv").set_index("parameter")
    assert {"KKILL", "FRES", "omega_KKILL"} <= set(summary.index)
    assert "CL" not in summary.index
    for name in ("report.html", "endpoints.csv", "decision.csv"):
        assert (out / "report" / name).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_demo_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "x"), "--draws", "0"]) == 2
    assert "--draws must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
