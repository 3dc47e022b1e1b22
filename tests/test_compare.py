"""Dose comparison (`pkpd compare`): decision metrics on designed truths, prior draws, fit
draws, serial = Dask, CLI errors without partial output, report rendering in Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkpd.cli import main
from pkpd.compare import CompareError, compare, prior_draws, prior_ranges, standard_regimen
from pkpd.model import load_model
from pkpd.trial import run_trial

REGIMENS = ["40 mg QW", "100 mg QW"]
# Designed truths (every draw the same values; the spread is between patients).
# Non-inferior: KI far below Cmax at 40 mg, slow XPO1 resynthesis → inhibition ≈ 75 % at both
# doses, and kill ≫ growth: the 40 mg clone shrinks as fast as the 100 mg one.
NONINFERIOR = dict(KI=50.0, KINACT=1.0, KOFF=0.0, KDEG=0.0058, KKILL=0.00125, FRES=0.01,
                   KG=5.64e-5, GAMMA_B=2.0)
# Inferior: weak binding and fast resynthesis → inhibition ≈ 4.5 % (40 mg) vs 8.4 % (100 mg),
# with kill × inhibition ≈ growth at 40 mg (clone stable) but > growth at 100 mg (shrinks).
INFERIOR = dict(KI=1000.0, KINACT=0.2, KOFF=0.01, KDEG=0.029, KKILL=0.00125, FRES=0.01,
                KG=5.64e-5, GAMMA_B=2.0)


def _truth(values: dict[str, float], draws: int = 5) -> pd.DataFrame:
    return pd.DataFrame({k: [v] * draws for k, v in values.items()})


@pytest.mark.slow
def test_decision_points_the_right_way_on_designed_truths():
    kw = dict(n=40, draws=5, years=1.5, seed=11, risk="high", sensitivity=False)
    res = compare(REGIMENS, source=_truth(NONINFERIOR), **kw)
    good = res.decision.iloc[0]
    assert good["LOW_DOSE"] == "40 mg QW" and good["STANDARD"] == "100 mg QW"
    assert good["P_PROGRESSION_NONINFERIOR"] >= 0.8
    assert good["P_AE_LOWER"] >= 0.8
    assert good["P_BENEFIT_VS_OBSERVATION"] >= 0.8
    assert good["DECISION"] == "supported"

    # margins move the metrics the right way without re-simulating
    assert res.decision.equals(res.decide())
    strict = res.decide(margin_ae=0.9).iloc[0]  # AEs cannot fall by 90 points
    assert strict["P_AE_LOWER"] == 0.0 and strict["DECISION"] == "not supported"
    assert res.decide(threshold=1.0).iloc[0]["P_AE_LOWER"] == good["P_AE_LOWER"]

    bad = compare(REGIMENS, source=_truth(INFERIOR), **kw).decision.iloc[0]
    assert bad["P_PROGRESSION_NONINFERIOR"] <= 0.5
    assert bad["DELTA_PROGRESSION_2Y"] > 0.05
    assert bad["DECISION"] == "not supported"
    # AEs depend on exposure only: the same in both truths
    assert bad["P_AE_LOWER"] >= 0.8


def test_prior_draws_follow_the_stated_ranges():
    m = load_model("selinexor_smm")
    ranges = prior_ranges(m)
    assert "KKILL" in ranges and "CL" not in ranges and "KA" not in ranges  # no range: fixed
    assert ranges["KKILL"][2] == "log-uniform" and ranges["KOFF"][2] == "uniform"
    d = prior_draws(m, 400, seed=3)
    assert d.equals(prior_draws(m, 400, seed=3))
    assert not d.equals(prior_draws(m, 400, seed=4))
    for k, (lo, hi, kind) in ranges.items():
        assert d[k].between(lo, hi).all()
        x = np.log(d[k]) if kind == "log-uniform" else d[k]
        a, b = (np.log(lo), np.log(hi)) if kind == "log-uniform" else (lo, hi)
        assert abs(x.median() - (a + b) / 2) < 0.12 * (b - a)  # centred on its scale


def test_standard_dose_default():
    assert standard_regimen(["40 mg QW", "100 mg QW", "80 mg BIW"]) == "100 mg QW"
    assert standard_regimen(["40 mg QW", "60 mg QW"]) == "60 mg QW"
    assert standard_regimen(["40 mg QW", "80 mg BIW"]) == "80 mg BIW"


def _posterior(folder: Path, chains: int = 2, draws: int = 5) -> Path:
    import arviz as az

    folder.mkdir()
    rng = np.random.default_rng(0)
    idata = az.from_dict(posterior={"KKILL": rng.uniform(1e-4, 1e-3, (chains, draws)),
                                    "omega_KKILL": rng.uniform(0.1, 0.5, (chains, draws)),
                                    "omega": rng.uniform(0.1, 0.5, (chains, draws))})
    idata.to_netcdf(str(folder / "posterior.nc"))
    return folder


def test_fit_source_uses_posterior_variables_named_like_parameters(tmp_path):
    fit = _posterior(tmp_path / "fit")
    c = compare(["40 mg QW"], source=fit, n=4, draws=3, years=0.25, seed=1,
                sensitivity=False, prior_rest=False)
    # "omega" is no model parameter; omega_KKILL is the SD of KKILL's IIV
    assert list(c.theta.columns) == ["DRAW", "KKILL", "omega_KKILL"]
    import arviz as az

    post = az.from_netcdf(str(fit / "posterior.nc")).posterior["KKILL"].values.reshape(-1)
    assert np.allclose(c.theta["KKILL"], post[[0, 4, 9]])  # evenly spaced over 10 draws
    # by default the assumptions the fit does not hold keep their prior uncertainty
    m = load_model("selinexor_smm")
    both = compare(["40 mg QW"], source=fit, n=2, draws=3, years=0.1, seed=1,
                   sensitivity=False)
    assert set(both.theta.columns) == {"DRAW", "omega_KKILL", *prior_ranges(m)}
    assert np.allclose(both.theta["KKILL"], post[[0, 4, 9]])
    rest = prior_draws(m, 3, 1, {k: v for k, v in prior_ranges(m).items() if k != "KKILL"})
    assert np.allclose(both.theta["KI"], rest["KI"])
    with pytest.raises(CompareError, match="exceeds the 10 posterior draws"):
        compare(["40 mg QW"], source=fit, n=4, draws=11, sensitivity=False)


def test_posterior_iiv_sets_the_between_patient_spread():
    """omega_<P> in theta is the SD of P's IIV: the model file's own ω reproduces the default
    run exactly (same standard-normal draws), ω = 0 makes every patient's P typical, and a
    larger ω widens the spread of the 1-year M-spike change."""
    m = load_model("selinexor_smm")
    w = float(np.sqrt(m.parameters["KKILL"].omega2))
    kw = dict(n=200, years=1.0, seed=3)
    base = run_trial("100 mg QW", **kw).patients
    same = run_trial("100 mg QW", theta={"omega_KKILL": w}, **kw).patients
    pd.testing.assert_frame_equal(base, same)
    spread = {}
    for sd in (0.0, w, 2 * w):
        ch = run_trial("100 mg QW", theta={"omega_KKILL": sd}, **kw).patients["MSPIKE_CHANGE_1Y"]
        spread[sd] = float(ch.quantile(0.9) - ch.quantile(0.1))
    assert spread[0.0] < spread[w] < spread[2 * w]
    with pytest.raises(ValueError, match="unknown parameter"):
        run_trial("100 mg QW", theta={"omega_NOPE": 0.1}, n=2, years=0.1)


def test_dask_equals_serial(tmp_path):
    from distributed import Client, LocalCluster

    kw = dict(n=8, draws=4, years=0.5, seed=5, block_size=2, sensitivity=False)
    serial = compare(REGIMENS, **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        dask = compare(REGIMENS, scheduler=client, **kw)
    serial.endpoints.to_csv(tmp_path / "a.csv", index=False)
    dask.endpoints.to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert serial.draws.equals(dask.draws)
    # a different seed gives different patients
    other = compare(REGIMENS, **{**kw, "seed": 6})
    assert not other.draws.equals(serial.draws)


@pytest.mark.parametrize("args, message", [
    (["--fit", "{tmp}/nofit"], "no such fit directory"),
    (["--prior", "--regimen", "forty mg weekly"], "regimen"),
    (["--fit", "{tmp}/fit", "--draws", "50"], "exceeds the 10 posterior draws"),
    (["--prior", "--n", "0"], "--n must be >= 1"),
    (["--prior", "--risk", "medium"], "--risk"),
    (["--prior", "--sensitivity-params", "CL"], "not an assumption parameter"),
])
def test_cli_bad_input_one_line_exit_2_no_files(tmp_path, capsys, args, message):
    _posterior(tmp_path / "fit")
    out = tmp_path / "out"
    argv = ["compare", *[a.format(tmp=tmp_path) for a in args], "--out", str(out),
            "--scheduler", "serial", "--years", "0.1"]
    argv += [] if "--n" in args else ["--n", "2"]
    argv += [] if "--draws" in args else ["--draws", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pkpd: error:") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit"]  # nothing written


def test_cli_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compare", "--prior", "--out", str(blocker / "out"), "--n", "2",
                 "--draws", "1", "--scheduler", "serial"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_cli_report_renders_in_headless_chromium(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--prior", "--regimen", "40 mg QW", "--regimen", "100 mg QW",
                 "--n", "6", "--draws", "3", "--years", "0.5", "--seed", "3",
                 "--sensitivity-params", "KKILL", "--sensitivity-n", "3",
                 "--sensitivity-draws", "2", "--scheduler", "serial", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "report.html" in err and "40 mg QW vs 100 mg QW" in err
    for f in ("endpoints.csv", "decision.csv", "sensitivity.csv", "differences.csv",
              "report.html", "exposure_xpo1.png", "mspike_bands.png", "km_progression.png",
              "km_pfs.png", "forest.png", "ae_rates.png", "tornado.png"):
        assert (out / f).is_file(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkpd-compare")]
    e = pd.read_csv(out / "endpoints.csv")
    assert set(e["REGIMEN"]) == {"40 mg QW", "100 mg QW", "none"}
    assert len(e) == 3 * 15
    s = pd.read_csv(out / "sensitivity.csv")
    assert set(s["PARAMETER"]) == {"(reference)", "KKILL"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "<img" in html
    assert "src='http" not in html and 'src="http' not in html  # self-contained

    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium not installed")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (out / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    gray = img[..., :3].mean(axis=2)
    assert gray.std() > 0.05  # text, tables and figures, not a blank page
    # the decision table is at the top: some non-white pixels in the first screen
    assert (gray[:600] < 0.5).mean() > 0.005


@pytest.mark.slow
def test_notebook_03_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = Path(__file__).parent.parent / "notebooks" / "03_dose_comparison.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6


def test_cli_scheduler_address_equals_serial(tmp_path, capsys):
    """`pkpd compare --scheduler ADDRESS` (here an in-process cluster's address) writes the
    same endpoints.csv as the in-process run, and shows progress."""
    from distributed import LocalCluster

    common = ["compare", "--prior", "--regimen", "60 mg QW", "--n", "3", "--draws", "6",
              "--years", "0.2", "--seed", "9", "--no-sensitivity"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        assert main([*common, "--scheduler", cluster.scheduler_address,
                     "--out", str(tmp_path / "dask")]) == 0
    assert main([*common, "--scheduler", "serial", "--out", str(tmp_path / "serial")]) == 0
    assert "blocks" in capsys.readouterr().err  # progress
    assert (tmp_path / "dask" / "endpoints.csv").read_bytes() == \
        (tmp_path / "serial" / "endpoints.csv").read_bytes()
