"""The command line as a user meets it: outputs, plots, one-line errors, no partial files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkpd.cli import main

GOOD = ("ID,TIME,AMT,EVID,CMT,DV\n1,0,100,1,1,.\n1,1,0,0,2,.\n1,4,0,0,2,.\n"
        "2,0,50,1,1,.\n2,2,0,0,2,.\n")


def run(args, capsys):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_data_simulation_one_row_per_record_in_order(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text(GOOD)
    out = tmp_path / "o.csv"
    rc, _, err = run(["simulate", "pk_1cmt_oral", "--data", data, "--out", out,
                      "--set", "CL=2", "--set", "V=10"], capsys)
    assert rc == 0 and "wrote" in err
    df = pd.read_csv(out)
    assert list(df.columns) == ["ID", "TIME", "EVID", "CP"]
    assert df["ID"].tolist() == [1, 1, 1, 2, 2] and df["TIME"].tolist() == [0, 1, 4, 0, 2]
    k, ka = 2 / 10, 1.0
    t = np.array([1.0, 4.0])
    bateman = 100 * ka / (10 * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))
    np.testing.assert_allclose(df["CP"].to_numpy()[1:3], bateman, rtol=1e-10)


def test_iiv_with_seed_is_reproducible_and_differs_from_typical(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text(GOOD)
    outs = []
    for i, extra in enumerate([[], ["--iiv", "--seed", "7"], ["--iiv", "--seed", "7"]]):
        out = tmp_path / f"o{i}.csv"
        assert run(["simulate", "pk_1cmt_oral", "--data", data, "--out", out, *extra],
                   capsys)[0] == 0
        outs.append(pd.read_csv(out)["CP"].to_numpy())
    np.testing.assert_array_equal(outs[1], outs[2])
    assert np.abs(outs[1] - outs[0]).max() > 1e-3


def test_regimen_population_and_plot(tmp_path, capsys):
    out, png = tmp_path / "sub" / "pop.csv", tmp_path / "sub" / "pop.png"
    rc, _, _ = run(["simulate", "selinexor_pk", "--regimen", "80 mg BIW for 2 weeks",
                    "--times", "0:336:2", "--n", "50", "--seed", "1", "--out", out,
                    "--plot", png], capsys)
    assert rc == 0
    df = pd.read_csv(out)
    assert len(df) == 50 * 169 and list(df.columns) == ["ID", "TIME", "CP"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    # doses at 0, 48, 168, 216 h: concentration jumps after each; none after 264 h rise
    typical = df.groupby("TIME")["CP"].median()
    assert typical[2] > 100 and typical[50] > 100 and typical[170] > 100
    assert typical[336] < 1


def test_set_covariate_on_regimen(tmp_path, capsys):
    outs = {}
    for wt in ("50", "100"):
        out = tmp_path / f"w{wt}.csv"
        assert run(["simulate", "selinexor_pk", "--regimen", "80 mg QW for 1 weeks", "--times",
                    "0:168:0.5", "--set", f"WT={wt}", "--out", out], capsys)[0] == 0
        outs[wt] = np.trapezoid(pd.read_csv(out)["CP"], dx=0.5)
    assert outs["50"] / outs["100"] == pytest.approx(2 ** 0.75, rel=5e-3)


def test_nca_prints_table(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert run(["simulate", "pk_1cmt_iv", "--regimen", "100 mg QD for 1 doses", "--times",
                "0:96:0.5", "--out", out], capsys)[0] == 0
    rc, text, _ = run(["nca", out, "--conc-unit", "mg/L"], capsys)
    assert rc == 0
    header, _, row = text.strip().splitlines()
    assert "CMAX (mg/L)" in header and "THALF (h)" in header
    table = pd.read_csv(out)
    assert table["CP"].iloc[0] == pytest.approx(2.0)  # 100 mg / 50 L, dose at t=0 included
    assert "6.931" in row  # t½ = ln2·V/CL = 0.693·50/5


BAD_DATA = {
    "non-numeric": ("ID,TIME,AMT\n1,0,100\n1,x,0\n", "row 3, column TIME: expected a number"),
    "decreasing-time": ("ID,TIME,AMT\n1,5,100\n1,2,0\n", "row 3, column TIME: expected TIME >= 5"),
    "unknown-cmt": ("ID,TIME,AMT,CMT\n1,0,100,7\n", "row 2, column CMT: expected CMT 0 or a "
                    "model compartment (1, 2)"),
    "no-time": ("ID,AMT\n1,100\n", "expected a column TIME"),
    "modeled-rate-without-R": ("ID,TIME,AMT,RATE\n1,0,100,-1\n", "model defines no R1"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_one_line_exit_2_no_output(tmp_path, capsys, case):
    text, expected = BAD_DATA[case]
    data = tmp_path / "bad.csv"
    data.write_text(text)
    out = tmp_path / "out.csv"
    rc, _, err = run(["simulate", "pk_1cmt_oral", "--data", data, "--out", out], capsys)
    assert rc == 2
    assert err.startswith(f"pkpd: error: {data.name}, ") and expected in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


BAD_MODEL = {
    "unknown-symbol": ('CENTRAL = "KA*DEPOT - K10*CENTRAL"', "unknown symbol 'K10'"),
    "bad-dosing-key": ('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"\n[dosing]\nFOO2 = "1"',
                       "[dosing] FOO2: expected ALAGn, Fn, Rn or Dn"),
}


@pytest.mark.parametrize("case", BAD_MODEL)
def test_bad_model_one_line_exit_2_no_output(tmp_path, capsys, case):
    line, expected = BAD_MODEL[case]
    text = (Path(__file__).parent.parent / "models" / "pk_1cmt_oral.toml").read_text()
    model = tmp_path / "m.toml"
    model.write_text(text.replace('CENTRAL = "KA*DEPOT - CL/V*CENTRAL"', line))
    data = tmp_path / "d.csv"
    data.write_text(GOOD)
    out = tmp_path / "out.csv"
    rc, _, err = run(["simulate", model, "--data", data, "--out", out], capsys)
    assert rc == 2 and expected in err and err.startswith(f"pkpd: error: {model}, line ")
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--regimen", "80 mg BIWX", "--times", "0:10:1"], "unknown frequency 'BIWX'"),
    (["--regimen", "80 mg QW", "--times", "10:0:1"], "--times '10:0:1'"),
    (["--regimen", "80 mg QW"], "--regimen needs --times"),
    (["--regimen", "80 mg QW", "--times", "0:10:1", "--n", "-3"], "--n must be >= 1"),
    (["--regimen", "80 mg QW", "--times", "0:10:1", "--set", "CLX=3"], "--set CLX"),
    (["--regimen", "80 mg QW", "--times", "0:10:1", "--set", "CL"], "expected NAME=NUMBER"),
])
def test_bad_arguments(tmp_path, capsys, args, expected):
    out = tmp_path / "o.csv"
    rc, _, err = run(["simulate", "selinexor_pk", *args, "--out", out], capsys)
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_model_lists_shipped(tmp_path, capsys):
    rc, _, err = run(["simulate", "no_such_model", "--regimen", "80 mg QW", "--times", "0:1:1",
                      "--out", tmp_path / "o.csv"], capsys)
    assert rc == 2 and "selinexor_pk" in err


def test_console_script_installed(tmp_path):
    """`pkpd` on PATH (the console script) runs the same code."""
    exe = Path(sys.executable).parent / "pkpd"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    res = subprocess.run([str(exe), "models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "selinexor_pk" in res.stdout and "nmtests_1001" in res.stdout
