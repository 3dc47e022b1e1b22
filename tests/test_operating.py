"""Operating characteristics by replicate fits (`pkpd oc`): serial = Dask (2 worker processes)
for the same seed, summary consistent with the per-replicate table, truths fed to the
simulator, CLI errors without output. Real fits of a tiny design (6 patients, 1 dose, 3
samples, 2 chains × 60 + 60); most of the time is nutpie's compilation, once per process."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pandas as pd
import pytest

from pkpd.cli import main
from pkpd.compare import _block_seed
from pkpd.model import load_model
from pkpd.operating import (
    Design,
    OperatingError,
    operating_characteristics,
    parse_times,
    replicate_data,
    summarise,
    write,
)
from pkpd.simulation import simulate

TINY = Design(n=6, regimen="80 mg QW for 1 week", times=(1.0, 4.0, 24.0),
              truth=(("CL", 20.0),))  # truth ≠ the model file's CL/F (16 L/h)
KW = dict(replicates=2, seed=5, chains=2, draws=60, tune=60)
CLI = ["oc", "--replicates", "2", "--n", "6", "--regimen", "80 mg QW for 1 week", "--times",
       "1,4,24", "--set", "CL=20", "--seed", "5", "--draws", "60", "--tune", "60"]


@pytest.fixture(scope="module")
def cluster():
    """A local Dask cluster of 2 worker processes."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as c, Client(c) as client:
        yield client


@pytest.fixture(scope="module")
def serial(cluster, tmp_path_factory):
    """The serial run (in worker process A); meanwhile worker B compiles its own model with a
    one-replicate serial run, so that each of the later runs on the cluster is fast."""
    a, b = sorted(cluster.scheduler_info()["workers"])
    kw = {**KW, "scheduler": "serial"}
    warm = cluster.submit(functools.partial(operating_characteristics, TINY,
                                            **{**kw, "replicates": 1}), workers=[b], pure=False)
    table = cluster.submit(functools.partial(operating_characteristics, TINY, **kw),
                           workers=[a], pure=False).result()
    one = warm.result()
    assert table.attrs["compile_seconds"] and one.attrs["compile_seconds"]  # compiled twice
    pd.testing.assert_frame_equal(one, table[table["REPLICATE"] == 0])
    out = tmp_path_factory.mktemp("serial")
    write(table, out)
    return table, out


@pytest.mark.slow
def test_dask_equals_serial(cluster, serial, tmp_path):
    """On the 2-worker cluster (one replicate per process) operating.csv is the serial run's,
    byte for byte."""
    table, out = serial
    dask = operating_characteristics(TINY, scheduler=cluster, **KW)
    assert dask.attrs["processes"] == 2
    write(dask, tmp_path)
    assert (tmp_path / "operating.csv").read_bytes() == (out / "operating.csv").read_bytes()
    assert (tmp_path / "operating_summary.csv").read_bytes() == \
        (out / "operating_summary.csv").read_bytes()
    pd.testing.assert_frame_equal(dask, table)


@pytest.mark.slow
def test_summary_follows_the_table_and_truths_are_the_simulations(serial):
    table, out = serial
    m = load_model("selinexor_pk")
    assert list(table["PARAMETER"].unique()) == TINY.estimated() == [
        "CL", "V2", "Q", "V3", "KA", "SEX_CL", "omega_CL", "omega_V2", "omega_KA",
        "sigma_prop_CP"]
    assert table["REPLICATE"].tolist() == [0] * 10 + [1] * 10
    truth = table.groupby("PARAMETER")["TRUTH"].first()
    assert truth["CL"] == 20.0 and truth["V2"] == m.parameters["V2"].value
    assert truth["omega_KA"] == pytest.approx(math.sqrt(m.parameters["KA"].omega2))
    assert truth["sigma_prop_CP"] == 0.2
    # per-row quantities
    assert (table["COVERED"] == ((table["LOWER"] <= table["TRUTH"])
                                 & (table["TRUTH"] <= table["UPPER"])).astype(int)).all()
    np.testing.assert_allclose(table["REL_BIAS"],
                               (table["MEDIAN"] - table["TRUTH"]) / table["TRUTH"])
    assert (table["LOWER"] < table["MEDIAN"]).all() and (table["MEDIAN"] < table["UPPER"]).all()
    assert (table.groupby("REPLICATE")[["MAX_RHAT", "MIN_ESS", "PROBLEM"]].nunique() == 1
            ).all().all()  # one set of diagnostics per fit
    # summary = aggregates of the table
    s = summarise(table).set_index("PARAMETER")
    assert list(s.index) == [*TINY.estimated(), "ALL"]
    g = table.groupby("PARAMETER")
    np.testing.assert_allclose(s.loc[truth.index, "COVERAGE"], g["COVERED"].mean())
    np.testing.assert_allclose(s.loc[truth.index, "MEAN_REL_BIAS"], g["REL_BIAS"].mean())
    rmse = g.apply(lambda d: np.sqrt(np.mean((d["MEDIAN"] - d["TRUTH"]) ** 2)))
    np.testing.assert_allclose(s.loc[truth.index, "RMSE"], rmse)
    np.testing.assert_allclose(s.loc[truth.index, "PRECISE_RATE"], g["PRECISE"].mean())
    assert s.loc["ALL", "COVERAGE"] == pytest.approx(table["COVERED"].mean())
    assert (s["PROBLEM_RATE"] == table.groupby("REPLICATE")["PROBLEM"].first().mean()).all()
    assert (s["N_REPLICATES"] == 2).all()
    assert pd.read_csv(out / "operating.csv").shape == table.shape
    # the simulator got the truth: without residual error, a replicate's DV is the model with
    # CL/F = 20 and the replicate's η
    exact = dataclasses.replace(TINY, sigma=1e-12)
    d = replicate_data(exact, 5, 1)
    obs = d["EVID"] == 0
    ref = simulate(m.with_values(CL=20.0), d.drop(columns="DV"), iiv=True,
                   seed=_block_seed(5, 0x0C, 1, 0))["CP"]
    np.testing.assert_allclose(d.loc[obs, "DV"], ref[obs], rtol=1e-9)
    assert not np.allclose(d.loc[obs, "DV"], replicate_data(exact, 5, 0).loc[obs, "DV"])
    # and the fits see it: CL/F near 20 (the priors are centred on the file's 16)
    cl = table.loc[table["PARAMETER"] == "CL", "MEDIAN"]
    assert (abs(cl - 20) < abs(cl - 16)).all()


@pytest.mark.slow
def test_cli_scheduler_address_writes_the_tables(cluster, serial, tmp_path, capsys):
    """`pkpd oc --scheduler ADDRESS` on the same design and seed writes the serial tables."""
    table, out = serial
    dest = tmp_path / "oc"
    address = cluster.scheduler.address
    assert main([*CLI, "--scheduler", address, "--out", str(dest)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {dest}/operating.csv and {dest}/operating_summary.csv" in err
    assert (dest / "operating.csv").read_bytes() == (out / "operating.csv").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["operating.csv", "operating_summary.csv"]


@pytest.mark.parametrize("extra, message", [
    (["--replicates", "0"], "--replicates must be >= 1, got 0"),
    (["--times", "0,4"], "--times '0,4': expected comma-separated sampling times > 0"),
    (["--times", "1,x"], "--times '1,x'"),
    (["--decision", "FOO<1"], "--decision FOO: not an estimated quantity"),
    (["--decision", "CL"], "--decision 'CL': expected NAME<VALUE or NAME>VALUE"),
    (["--regimen", "80 mg"], "--regimen"),
    (["--model", "selinexor_smm"], "need a linear model"),
    (["--set", "FOO=1"], "--set FOO: selinexor_pk has no parameter"),
    (["--draws", "0"], "--draws must be an integer >= 1"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--level", "1.5"], "--level must be in (0, 1)"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    args = list(CLI)
    for i in range(0, len(extra), 2):  # replace a CLI option or add it
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    dest = tmp_path / "oc"
    assert main([*args, "--scheduler", "serial", "--out", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pkpd: error: ") and message in err[0], err
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_cli_unwritable_out_writes_nothing(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for dest in (blocker, blocker / "oc", tmp_path / "missing" / "oc"):
        assert main([*CLI, "--scheduler", "serial", "--out", str(dest)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a writable directory" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert blocker.read_text() == "x"


def test_times_and_decision_parsing():
    assert parse_times("0.5|1,4,24") == ((0.5, 1.0), 4.0, 24.0)
    assert Design(times=[[0.5, 1], 4]).times == ((0.5, 1.0), 4.0)
    with pytest.raises(OperatingError, match="replicates"):
        operating_characteristics(TINY, replicates=0, scheduler="serial")
