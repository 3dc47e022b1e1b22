"""Tests for pkpd.dataset (NONMEM CSV datasets) and pkpd._io (atomic writes)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkpd._io import atomic_path, atomic_write, atomic_write_csv, atomic_write_text
from pkpd.dataset import (
    STANDARD,
    Dataset,
    DatasetError,
    check_against_model,
    from_frame,
    read_nonmem,
    write_nonmem,
)

NMTESTS = Path("/work/shared/conformance/nmtests-dosing/1001.csv")
HEAD = "ID,TIME,EVID,AMT,CMT,DV"


def write(tmp_path: Path, text: str, name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def lines(*rows: str) -> str:
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- malformed files

MALFORMED: list[tuple[str, str, str]] = [
    ("empty", "", "bad.csv: expected a header line, got an empty file"),
    (
        "only_comments",
        lines("# a comment", "", "@ another"),
        "bad.csv: expected a header line, got only comments and blank lines",
    ),
    (
        "no_data_rows",
        lines("# study 1", HEAD, "# nothing yet"),
        "bad.csv: expected at least one data record after the header (row 2), got none",
    ),
    (
        "missing_time_column",
        lines("ID,AMT,DV", "1,100,."),
        "bad.csv, row 1: expected a column TIME, got columns ID, AMT, DV",
    ),
    (
        "missing_id_column",
        lines("time,amt,dv", "0,100,."),
        "bad.csv, row 1: expected a column ID, got columns TIME, AMT, DV",
    ),
    (
        "duplicate_column_ignoring_case",
        lines("ID,TIME,DV,time", "1,0,.,0"),
        "bad.csv, row 1, column 4: expected a unique column name, got 'time' "
        "(same as column 2, 'TIME')",
    ),
    (
        "empty_column_name",
        lines("ID,TIME,,DV", "1,0,1,."),
        "bad.csv, row 1, column 3: expected a column name, got an empty field",
    ),
    (
        "non_numeric_time",
        lines(HEAD, "1,0,1,100,1,.", "1,abc,0,0,1,5"),
        "bad.csv, row 3, column TIME: expected a number or '.', got 'abc'",
    ),
    (
        "non_numeric_covariate",
        lines("ID,TIME,AMT,WT", "1,0,100,70", "2,0,100,NA"),
        "bad.csv, row 3, column WT: expected a number or '.', got 'NA'",
    ),
    (
        "nan_literal_is_not_a_number",
        lines("ID,TIME,DV", "1,0,nan"),
        "bad.csv, row 2, column DV: expected a number or '.', got 'nan'",
    ),
    (
        "ragged_row_short",
        lines(HEAD, "1,0,1,100,1,.", "1,1,0,0,1"),
        "bad.csv, row 3: expected 6 fields (as in the header), got 5",
    ),
    (
        "ragged_row_long",
        lines(HEAD, "1,0,1,100,1,.,7"),
        "bad.csv, row 2: expected 6 fields (as in the header), got 7",
    ),
    (
        "missing_id",
        lines(HEAD, "1,0,1,100,1,.", ".,1,0,0,1,5"),
        "bad.csv, row 3, column ID: expected an ID, got a missing value",
    ),
    (
        "missing_time",
        lines(HEAD, "1,,1,100,1,."),
        "bad.csv, row 2, column TIME: expected a TIME, got a missing value",
    ),
    (
        "negative_time",
        lines(HEAD, "1,-0.5,1,100,1,."),
        "bad.csv, row 2, column TIME: expected TIME >= 0, got -0.5",
    ),
    (
        "time_decreasing",
        lines(HEAD, "1,0,1,100,1,.", "1,12,0,0,1,5", "1,3,0,0,1,4"),
        "bad.csv, row 4, column TIME: expected TIME >= 12 (previous record of ID 1), got 3",
    ),
    (
        "time_decreasing_on_evid2",
        lines(HEAD, "1,0,1,100,1,.", "1,12,0,0,1,5", "1,3,2,0,1,."),
        "bad.csv, row 4, column TIME: expected TIME >= 12 (previous record of ID 1), got 3",
    ),
    (
        "id_not_contiguous",
        lines(HEAD, "1,0,1,100,1,.", "1,1,0,0,1,5", "2,0,1,100,1,.", "1,2,0,0,1,3"),
        "bad.csv, row 5, column ID: expected the records of ID 1 to be contiguous "
        "(they ended at row 3), got ID 1 again after ID 2",
    ),
    (
        "evid_out_of_range",
        lines(HEAD, "1,0,5,100,1,."),
        "bad.csv, row 2, column EVID: expected EVID 0, 1, 2, 3 or 4, got 5",
    ),
    (
        "evid_not_integer",
        lines(HEAD, "1,0,1.5,100,1,."),
        "bad.csv, row 2, column EVID: expected EVID 0, 1, 2, 3 or 4, got 1.5",
    ),
    (
        "cmt_not_integer",
        lines(HEAD, "1,0,1,100,1.5,."),
        "bad.csv, row 2, column CMT: expected a non-negative integer, got 1.5",
    ),
    (
        "cmt_negative",
        lines(HEAD, "1,0,1,100,-2,."),
        "bad.csv, row 2, column CMT: expected a non-negative integer, got -2",
    ),
    (
        "addl_negative",
        lines("ID,TIME,AMT,II,ADDL", "1,0,100,12,-1"),
        "bad.csv, row 2, column ADDL: expected a non-negative integer, got -1",
    ),
    (
        "ss_out_of_range",
        lines("ID,TIME,AMT,II,SS", "1,0,100,12,3"),
        "bad.csv, row 2, column SS: expected SS 0, 1 or 2, got 3",
    ),
    (
        "mdv_out_of_range",
        lines("ID,TIME,AMT,MDV,DV", "1,0,100,1,.", "1,1,0,2,5"),
        "bad.csv, row 3, column MDV: expected MDV 0 or 1, got 2",
    ),
    (
        "mdv_zero_on_dose",
        lines("ID,TIME,EVID,AMT,MDV,DV", "1,0,1,100,0,."),
        "bad.csv, row 2, column MDV: expected MDV 1 on a non-observation record (EVID 1), got 0",
    ),
    (
        "amt_negative",
        lines(HEAD, "1,0,1,-100,1,."),
        "bad.csv, row 2, column AMT: expected AMT >= 0, got -100",
    ),
    (
        "ii_negative",
        lines("ID,TIME,AMT,II", "1,0,100,-12"),
        "bad.csv, row 2, column II: expected II >= 0, got -12",
    ),
    (
        "rate_negative_other_than_codes",
        lines("ID,TIME,AMT,RATE", "1,0,100,-3"),
        "bad.csv, row 2, column RATE: expected RATE >= 0, -1 or -2, got -3",
    ),
    (
        "dose_amt_zero",
        lines(HEAD, "1,0,1,0,1,."),
        "bad.csv, row 2, column AMT: expected AMT > 0 on a dose record (EVID 1), got 0",
    ),
    (
        "dose_amt_missing",
        lines(HEAD, "1,0,4,.,1,."),
        "bad.csv, row 2, column AMT: expected AMT > 0 on a dose record (EVID 4), "
        "got a missing value",
    ),
    (
        "amt_on_observation",
        lines(HEAD, "1,0,0,100,1,5"),
        "bad.csv, row 2, column AMT: expected AMT 0 or '.' on a non-dose record (EVID 0), got 100",
    ),
    (
        "ss_on_non_dose",
        lines("ID,TIME,EVID,AMT,SS,II", "1,0,2,0,1,12"),
        "bad.csv, row 2, column SS: expected SS 0 or '.' on a non-dose record (EVID 2), got 1",
    ),
    (
        "addl_on_non_dose",
        lines("ID,TIME,EVID,AMT,ADDL,II", "1,0,1,100,0,0", "1,1,0,0,3,12"),
        "bad.csv, row 3, column ADDL: expected ADDL 0 or '.' on a non-dose record (EVID 0), got 3",
    ),
    (
        "addl_without_ii",
        lines("ID,TIME,AMT,ADDL,II", "1,0,100,3,0"),
        "bad.csv, row 2, column II: expected II > 0 because ADDL is 3, got 0",
    ),
    (
        "ss2_without_ii",
        lines("ID,TIME,AMT,SS,II", "1,0,100,2,."),
        "bad.csv, row 2, column II: expected II > 0 because SS is 2, got 0",
    ),
    (
        "ss1_bolus_without_ii",
        lines("ID,TIME,AMT,SS,II,RATE", "1,0,100,1,0,10"),
        "bad.csv, row 2, column II: expected II > 0 because SS is 1, got 0",
    ),
    (
        "row_numbers_count_comments_and_blank_lines",
        lines("# header follows", HEAD, "1,0,1,100,1,.", "@ skipped", "", "1,2,0,0,1,x"),
        "bad.csv, row 6, column DV: expected a number or '.', got 'x'",
    ),
    (
        "ignore_c_rows_are_counted",
        lines("C,ID,TIME,AMT", ".,1,0,100", "C,1,xx,0", "c,1,yy,0", ".,1,-1,0"),
        "bad.csv, row 5, column TIME: expected TIME >= 0, got -1",
    ),
    (
        "first_problem_in_file_order_wins",
        lines(HEAD, "1,0,1,100,1,.", "1,1,9,0,1,3", "1,abc,0,0,1", "1,-1,0,0,1,5"),
        "bad.csv, row 3, column EVID: expected EVID 0, 1, 2, 3 or 4, got 9",
    ),
    (
        "first_bad_column_of_a_row_wins",
        lines(HEAD, "1,0,1,100,one,two"),
        "bad.csv, row 2, column CMT: expected a number or '.', got 'one'",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"), [(t, m) for _, t, m in MALFORMED], ids=[k for k, _, _ in MALFORMED]
)
def test_malformed_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DatasetError) as info:
        read_nonmem(path)
    assert str(info.value) == message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    with pytest.raises(DatasetError) as info:
        read_nonmem(path)
    assert str(info.value) == f"bad.csv: file not found ({path})"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"ID,TIME,WT\n1,0,70\n2,0,\xe970\n")
    with pytest.raises(DatasetError) as info:
        read_nonmem(path)
    assert str(info.value) == "bad.csv, row 3: expected UTF-8 text, got byte 0xe9"


def test_dataset_error_is_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------- accepted files


def test_nonmem_habits_accepted(tmp_path: Path) -> None:
    """Resets, SS infusions, II without ADDL, RATE codes on observations, BOM, blank lines."""
    text = lines(
        "id,Time,evid,amt,cmt,rate,ii,addl,ss,dv",
        "1,0,1,100,1,0,12,0,0,.",  # II > 0 with ADDL 0 and SS 0 is allowed
        "1,24,0,0,1,-1,0,0,0,3.5",  # RATE -1 on an observation is ignored
        "1,2,4,50,1,0,0,0,0,.",  # EVID 4 resets time
        "1,1,3,0,1,0,0,0,0,.",  # EVID 3 resets time
        "",
        "2,0,1,0,1,10,0,0,1,.",  # steady-state constant infusion: SS 1, AMT 0, RATE > 0, II 0
        "2,1,0,.,.,.,.,.,.,4",
    )
    path = tmp_path / "ok.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = read_nonmem(path)
    assert list(ds.data.columns) == list(STANDARD)
    assert list(ds.rows) == [2, 3, 4, 5, 7, 8]
    assert ds.ids.tolist() == [1.0, 2.0]
    assert ds.n_subjects == 2
    assert ds.data["TIME"].tolist() == [0, 24, 2, 1, 0, 1]
    assert ds.data.loc[5, ["AMT", "CMT", "RATE", "II", "ADDL", "SS", "MDV"]].tolist() == [0] * 7
    assert all(dtype == np.float64 for dtype in ds.data.dtypes)


def test_comment_rows_keep_row_numbering(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        lines("# study X", "@ version 2", HEAD, "1,0,1,100,1,.", "# note", "1,1,0,0,1,5"),
        name="data.csv",
    )
    ds = read_nonmem(path)
    assert ds.source == "data.csv"
    assert list(ds.rows) == [4, 6]
    assert ds.where(1, "TIME") == "data.csv, row 6, column TIME"
    assert ds.where(0) == "data.csv, row 4"


def test_ignore_c_drops_column_and_comment_rows(tmp_path: Path) -> None:
    path = write(tmp_path, lines("c,ID,TIME,AMT,WT", ".,1,0,100,70", "C,1,1,0,.", "x,1,2,0,."))
    ds = read_nonmem(path)
    assert "C" not in ds.data.columns
    assert list(ds.rows) == [2, 4]
    assert ds.covariates == ["WT"]
    assert np.isnan(ds.data.loc[1, "WT"])


def test_evid_and_mdv_derivation(tmp_path: Path) -> None:
    path = write(
        tmp_path, lines("ID,TIME,AMT,MDV,DV", "1,0,100,.,.", "1,1,0,1,.", "1,2,0,0,5", "1,3,.,.,4")
    )
    data = read_nonmem(path).data
    assert data["EVID"].tolist() == [1, 2, 0, 0]
    assert data["MDV"].tolist() == [1, 1, 0, 0]
    assert data["DV"].isna().tolist() == [True, True, False, False]


def test_evid_derivation_without_mdv_and_missing_evid_values(tmp_path: Path) -> None:
    data = read_nonmem(write(tmp_path, lines("ID,TIME,AMT", "1,0,100", "1,1,0"))).data
    assert data["EVID"].tolist() == [1, 0]
    assert data["MDV"].tolist() == [1, 0]
    data = read_nonmem(write(tmp_path, lines("ID,TIME,EVID,AMT", "1,0,.,100", "1,1,,."))).data
    assert data["EVID"].tolist() == [1, 0]


@pytest.mark.skipif(not NMTESTS.exists(), reason="nmtests conformance data not available")
def test_read_nmtests_1001() -> None:
    ds = read_nonmem(NMTESTS)
    assert len(ds) == 3837
    assert ds.n_subjects == 29
    assert ds.ids.tolist() == list(range(1, 30))
    assert ds.source == "1001.csv"
    assert list(ds.data.columns) == [*STANDARD, "LAGT", "MODE", "DUR2", "RAT2", "BIOAV"]
    assert ds.rows[0] == 2 and ds.rows[-1] == 3838
    assert set(ds.data["EVID"].unique()) == {0, 1, 3, 4}
    assert ds.data["DV"].isna().all()
    assert (ds.data["RATE"] == -2).sum() == 3
    filled = check_against_model(
        ds,
        compartments={1, 2},
        modeled_rate={2},
        modeled_duration={2},
        covariates={"LAGT": None, "BIOAV": None, "WT": 70.0},
        default_dose_cmt=1,
    )
    assert (filled.data["WT"] == 70).all()
    assert "WT" not in ds.data.columns  # the input is not modified


@pytest.mark.skipif(not NMTESTS.exists(), reason="nmtests conformance data not available")
def test_round_trip_nmtests(tmp_path: Path) -> None:
    ds = read_nonmem(NMTESTS)
    out = tmp_path / "copy.csv"
    write_nonmem(ds, out)
    again = read_nonmem(out)
    pd.testing.assert_frame_equal(again.data, ds.data)
    assert list(again.rows) == list(range(2, 3839))


def test_round_trip_and_format(tmp_path: Path) -> None:
    src = write(
        tmp_path,
        lines("id,time,amt,rate,dv,wt", "1,0,100,8.33333333333333,.,70.5", "1,0.25,.,.,1e-05,."),
        name="in.csv",
    )
    ds = read_nonmem(src)
    out = tmp_path / "out.csv"
    write_nonmem(ds, out)
    text = out.read_text()
    assert text.splitlines()[0] == ",".join([*STANDARD, "WT"])
    assert text.splitlines()[1] == "1,0,1,100,0,8.33333333333333,0,0,0,1,.,70.5"
    assert text.splitlines()[2] == "1,0.25,0,0,0,0,0,0,0,0,1e-05,."
    pd.testing.assert_frame_equal(read_nonmem(out).data, ds.data)
    assert sorted(os.listdir(tmp_path)) == ["in.csv", "out.csv"]


def test_write_plain_frame_uppercases_header(tmp_path: Path) -> None:
    out = tmp_path / "frame.csv"
    write_nonmem(pd.DataFrame({"id": [1, 1], "time": [0.0, 1.5], "dv": [np.nan, 2.0]}), out)
    assert out.read_text() == "ID,TIME,DV\n1,0,.\n1,1.5,2\n"


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(
    times=st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), min_size=1, max_size=8),
    covariate=st.lists(st.one_of(st.just(np.nan), finite), min_size=8, max_size=8),
)
def test_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, times: list[float], covariate: list[float]
) -> None:
    times = sorted(times)
    n = len(times)
    df = pd.DataFrame({"ID": [7] * n, "TIME": times, "DV": covariate[:n], "X": covariate[-n:]})
    ds = from_frame(df)
    out = tmp_path_factory.mktemp("rt") / "rt.csv"
    write_nonmem(ds, out)
    pd.testing.assert_frame_equal(read_nonmem(out).data, ds.data)


# --------------------------------------------------------------------------- from_frame


def test_from_frame_valid() -> None:
    df = pd.DataFrame({"id": [1, 1, 2], "TIME": [0, 1, 0], "AMT": [100, 0, 50], "wt": [70, 70, 80]})
    ds = from_frame(df)
    assert ds.source == "<memory>"
    assert list(ds.rows) == [2, 3, 4]
    assert ds.data["EVID"].tolist() == [1, 0, 1]
    assert ds.covariates == ["WT"]


def test_from_frame_errors() -> None:
    df = pd.DataFrame({"ID": [1, 1], "TIME": ["0", "abc"]})
    with pytest.raises(DatasetError) as info:
        from_frame(df, source="frame")
    assert str(info.value) == "frame, row 3, column TIME: expected a number or '.', got 'abc'"
    df = pd.DataFrame([[1, 0, 0]], columns=["ID", "TIME", "id"])
    with pytest.raises(DatasetError) as info:
        from_frame(df)
    assert str(info.value) == (
        "<memory>, row 1, column 3: expected a unique column name, "
        "got 'id' (same as column 1, 'ID')"
    )
    df = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, np.inf]})
    with pytest.raises(DatasetError) as info:
        from_frame(df)
    assert str(info.value) == "<memory>, row 3, column TIME: expected a number or '.', got 'inf'"


# --------------------------------------------------------------------------- check_against_model

MODEL = {
    "compartments": {1, 2},
    "modeled_rate": {2},
    "modeled_duration": set(),
    "default_dose_cmt": 1,
}


def check(path: Path, covariates: dict[str, float | None] | None = None) -> Dataset:
    return check_against_model(read_nonmem(path), covariates=covariates or {}, **MODEL)


@pytest.mark.parametrize(
    ("text", "covariates", "message"),
    [
        (
            lines(HEAD, "1,0,1,100,1,.", "1,1,0,0,3,5"),
            {},
            "bad.csv, row 3, column CMT: expected CMT 0 or a model compartment (1, 2), got 3",
        ),
        (
            lines("ID,TIME,AMT,CMT,RATE", "1,0,100,1,-1"),
            {},
            "bad.csv, row 2, column RATE: expected RATE -1 only on doses into a compartment "
            "with a modeled rate, got a dose into compartment 1 (model defines no R1)",
        ),
        (
            lines("ID,TIME,AMT,CMT,RATE", "1,0,100,2,-2"),
            {},
            "bad.csv, row 2, column RATE: expected RATE -2 only on doses into a compartment "
            "with a modeled duration, got a dose into compartment 2 (model defines no D2)",
        ),
        (
            lines("ID,TIME,AMT,CMT,RATE", "1,0,100,0,-1"),  # CMT 0 -> default_dose_cmt 1
            {},
            "bad.csv, row 2, column RATE: expected RATE -1 only on doses into a compartment "
            "with a modeled rate, got a dose into compartment 1 (model defines no R1)",
        ),
        (
            lines("ID,TIME,AMT", "1,0,100"),
            {"WT": None},
            "bad.csv: expected a column WT (a covariate of the model, no default given), "
            "got columns ID, TIME, EVID, AMT, CMT, RATE, II, ADDL, SS, MDV, DV",
        ),
        (
            lines("ID,TIME,AMT,WT", "1,0,100,70", "2,0,100,.", "2,1,0,."),
            {"WT": None},
            "bad.csv, row 3, column WT: expected at least one value of WT for ID 2 "
            "(no default given), got only missing values",
        ),
    ],
    ids=["cmt", "rate_no_R", "rate_no_D", "rate_default_cmt", "covariate_absent", "cov_all_nan"],
)
def test_check_against_model_errors(
    tmp_path: Path, text: str, covariates: dict[str, float | None], message: str
) -> None:
    with pytest.raises(DatasetError) as info:
        check(write(tmp_path, text), covariates)
    assert str(info.value) == message


def test_check_against_model_accepts_and_fills(tmp_path: Path) -> None:
    text = lines(
        "ID,TIME,AMT,CMT,RATE,WT,CRCL,SEX",
        "1,0,100,2,-1,.,.,1",  # RATE -1 into compartment 2, which has a modeled rate
        "1,1,0,2,-2,70,.,1",  # RATE -2 on an observation is ignored
        "1,2,0,2,0,.,.,1",
        "1,3,0,2,0,72,.,1",
        "1,4,0,2,0,.,.,1",
        "2,0,100,0,0,.,.,0",
        "2,1,0,2,0,.,.,0",
    )
    ds = read_nonmem(write(tmp_path, text, name="ok.csv"))
    out = check_against_model(
        ds, covariates={"wt": 75.0, "CRCL": 100.0, "AGE": 40.0, "SEX": None}, **MODEL
    )
    assert isinstance(out, Dataset) and out is not ds
    # NOCB within a subject, then LOCF for trailing gaps; default for an all-missing subject
    assert out.data["WT"].tolist() == [70, 70, 72, 72, 72, 75, 75]
    assert out.data["CRCL"].tolist() == [100] * 7
    assert out.data["AGE"].tolist() == [40] * 7
    assert np.isnan(ds.data.loc[0, "WT"])  # the input is not modified
    assert list(out.rows) == list(ds.rows) and out.source == ds.source


def test_check_against_model_bad_default_cmt(tmp_path: Path) -> None:
    ds = read_nonmem(write(tmp_path, lines("ID,TIME,AMT", "1,0,100")))
    with pytest.raises(
        ValueError, match=r"^default_dose_cmt 3 is not a model compartment \(1, 2\)$"
    ):
        check_against_model(
            ds,
            compartments={1, 2},
            modeled_rate=set(),
            modeled_duration=set(),
            covariates={},
            default_dose_cmt=3,
        )


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")

    def half_write(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, half_write)
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]


def test_atomic_path_failure_new_file(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        tmp.write_text("x")
        raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_write_nonmem_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.csv"
    target.write_text("old\n")
    bad = pd.DataFrame({"ID": [1.0], "TIME": [np.inf]})
    with pytest.raises(ValueError, match="infinite"):
        write_nonmem(bad, target)
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["data.csv"]


def test_atomic_write_text_and_csv(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new\r\ntext")
    assert target.read_bytes() == b"new\r\ntext"
    assert target.stat().st_mode & 0o777 == 0o640
    atomic_write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "b.csv")
    assert (tmp_path / "b.csv").read_text() == "a\n1\n2\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.csv"]


def test_atomic_write_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "out.csv"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write_text(target, "x")
    assert str(info.value) == (
        f"cannot write {target}: directory {tmp_path / 'nope'} does not exist"
    )
    with pytest.raises(FileNotFoundError):
        write_nonmem(pd.DataFrame({"ID": [1]}), target)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_atomic_write_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as info:
            atomic_write_text(locked / "x.txt", "x")
        assert (
            str(info.value)
            == f"cannot write {locked / 'x.txt'}: directory {locked} is not writable"
        )
    finally:
        locked.chmod(0o700)


def test_time_after_dose_follows_nonmem_record_order_addl_and_resets():
    """TAD by hand: ADDL copies count, a dose record counts for the records after it (an
    observation before it in the file at the same time sees the previous dose), resets
    forget earlier doses, NaN before any dose."""
    rec = [  # (ID, TIME, EVID, AMT, II, ADDL) → expected TAD
        ((1, 0.0, 0, 0, 0, 0), np.nan),   # before the first dose
        ((1, 0.0, 1, 10, 24, 2), 0.0),    # the dose itself; copies at 24 and 48
        ((1, 0.0, 0, 0, 0, 0), 0.0),
        ((1, 12.0, 0, 0, 0, 0), 12.0),
        ((1, 24.0, 0, 0, 0, 0), 0.0),     # ADDL copy at 24 comes first
        ((1, 50.0, 0, 0, 0, 0), 2.0),
        ((1, 53.0, 0, 0, 0, 0), 5.0),
        ((1, 53.0, 1, 10, 0, 0), 0.0),    # dose after the observation at the same time
        ((1, 55.0, 0, 0, 0, 0), 2.0),
        ((1, 60.0, 3, 0, 0, 0), np.nan),  # reset
        ((1, 70.0, 0, 0, 0, 0), np.nan),
        ((1, 80.0, 4, 5, 0, 0), 0.0),     # reset and dose
        ((1, 85.5, 0, 0, 0, 0), 5.5),
        ((2, 0.0, 0, 0, 0, 0), np.nan),   # a new subject starts without doses
        ((2, 1.0, 1, 10, 0, 0), 0.0),
        ((2, 4.0, 0, 0, 0, 0), 3.0),
    ]
    df = pd.DataFrame([dict(zip(("ID", "TIME", "EVID", "AMT", "II", "ADDL"), r, strict=True))
                       for r, _ in rec])
    np.testing.assert_array_equal(from_frame(df).time_after_dose(), [x for _, x in rec])
