"""NONMEM's own output for the 29 dosing scenarios of mrgsolve/nmtests, run through the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkpd.cli import main


@pytest.fixture(scope="module")
def nonmem(nmtests_dir):
    return pd.read_csv(nmtests_dir / "1001-nm.csv")


def _check(ours: pd.DataFrame, nonmem: pd.DataFrame) -> None:
    assert len(ours) == len(nonmem) == 3837
    np.testing.assert_array_equal(ours["ID"].to_numpy(), nonmem["ID"].to_numpy())
    np.testing.assert_array_equal(ours["TIME"].to_numpy(), nonmem["TIME"].to_numpy())
    cp, ref = ours["CP"].to_numpy(), nonmem["CP"].to_numpy()
    zero = np.abs(ref) < 1e-6
    # NONMEM prints 5 significant digits: relative 1e-4, absolute 1e-6 at zero
    assert np.all(np.abs(cp[zero]) < 1e-6)
    rel = np.abs(cp[~zero] - ref[~zero]) / np.abs(ref[~zero])
    bad = nonmem.loc[~zero].loc[rel > 1e-4, "ID"].unique()
    assert len(bad) == 0, f"scenarios off by more than 1e-4: IDs {sorted(bad)}"
    assert rel.max() < 1e-4


@pytest.mark.parametrize("method", ["auto", "expm"])
def test_all_29_scenarios_through_cli(nmtests_dir, nonmem, tmp_path, method):
    out = tmp_path / "cp.csv"
    rc = main(["simulate", "nmtests_1001", "--data", str(nmtests_dir / "1001.csv"),
               "--out", str(out), "--method", method])
    assert rc == 0
    ours = pd.read_csv(out)
    assert set(ours["ID"]) == set(range(1, 30))
    _check(ours, nonmem)


@pytest.mark.slow
def test_all_29_scenarios_with_ode_reference(nmtests_dir, nonmem, tmp_path):
    """The scipy reference (steady state by cycling to convergence) matches NONMEM too."""
    out = tmp_path / "cp.csv"
    assert main(["simulate", "nmtests_1001", "--data", str(nmtests_dir / "1001.csv"),
                 "--out", str(out), "--method", "ode"]) == 0
    _check(pd.read_csv(out), nonmem)


def test_model_file_matches_control_stream(nmtests_dir):
    """The shipped model carries the $THETA of 1001.ctl."""
    from pkpd.model import load_model

    ctl = (nmtests_dir / "1001.ctl").read_text()
    assert "(1.1,   FIX)" in ctl and "(20,  FIX)" in ctl and "(1.5, FIX)" in ctl
    m = load_model("nmtests_1001")
    assert m.theta == {"CL": 1.1, "V": 20.0, "KA": 1.5}
    assert set(m.dosing) == {"ALAG2", "F2", "R2", "D2"}
