"""Tests for pkpd.regimen: parsing, hold/reduce, NONMEM record round trips."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pkpd.regimen import Regimen, RegimenError

WEEK = 168.0
FREQ_HELP = "(expected QD, BID, QW, BIW, TIW, Q2W, Q3W, Q4W, Q<n>H, Q<n>D)"


def assert_same_doses(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- dose times
def test_qw_four_weeks() -> None:
    t, a = Regimen.parse("100 mg QW for 4 weeks").doses()
    np.testing.assert_array_equal(t, [0, 168, 336, 504])
    np.testing.assert_array_equal(a, [100] * 4)


def test_biw_four_weeks_is_days_1_and_3() -> None:
    t, a = Regimen.parse("80 mg BIW for 4 weeks").doses()
    np.testing.assert_array_equal(t, [0, 48, 168, 216, 336, 384, 504, 552])
    assert len(t) == 8
    assert a.sum() == 640


def test_tiw_and_qd_and_bid() -> None:
    t, _ = Regimen.parse("10 mg TIW for 1 week").doses()
    np.testing.assert_array_equal(t, [0, 48, 96])
    t, _ = Regimen.parse("5 mg QD for 4 weeks").doses()
    np.testing.assert_array_equal(t, np.arange(28) * 24.0)
    t, _ = Regimen.parse("5 mg BID for 2 days").doses()
    np.testing.assert_array_equal(t, [0, 12, 24, 36])


@pytest.mark.parametrize(
    ("text", "times"),
    [
        ("1 mg Q8H for 1 day", [0, 8, 16]),
        ("1 mg Q2D for 1 week", [0, 48, 96, 144]),
        ("1 mg Q2W for 6 weeks", [0, 336, 672]),
        ("1 mg Q3W for 9 weeks", [0, 504, 1008]),
        ("1 mg Q4W for 3 cycles", [0, 672, 1344]),
        ("1 mg QW for 10 days", [0, 168]),
        ("1 mg BIW for 3 doses", [0, 48, 168]),
        ("1 mg QD for 2.5 days", [0, 24, 48]),
    ],
)
def test_frequencies_and_durations(text: str, times: list[float]) -> None:
    np.testing.assert_array_equal(Regimen.parse(text).doses()[0], times)


def test_case_and_whitespace_tolerant() -> None:
    a = Regimen.parse("  80MG   biw  FOR 4   Weeks ").doses()
    b = Regimen.parse("80 mg BIW for 4 weeks").doses()
    assert_same_doses(a, b)


def test_then_chaining_starts_next_phase_after_duration() -> None:
    r = Regimen.parse("100 mg QW for 4 weeks, then 80 mg QW for 8 weeks")
    t, a = r.doses()
    np.testing.assert_array_equal(t, np.arange(12) * WEEK)
    np.testing.assert_array_equal(a, [100] * 4 + [80] * 8)
    assert t[4] == 672
    assert r.total_dose(until=10_000) == 4 * 100 + 8 * 80
    assert r.weekly_dose == 100


def test_then_after_dose_count_starts_when_next_dose_due() -> None:
    t, a = Regimen.parse("80 mg BIW for 3 doses, then 40 mg QD for 2 days").doses()
    np.testing.assert_array_equal(t, [0, 48, 168, 216, 240])
    np.testing.assert_array_equal(a, [80, 80, 80, 40, 40])


def test_none_and_leading_gap() -> None:
    r = Regimen.parse("None")
    t, a = r.doses()
    assert len(t) == len(a) == 0
    assert r.total_dose() == 0.0
    assert r.weekly_dose == 0.0
    assert len(r.to_records()) == 0
    t, _ = Regimen.parse("none for 1 week, then 10 mg QW for 2 weeks").doses()
    np.testing.assert_array_equal(t, [168, 336])


def test_open_ended_needs_until() -> None:
    r = Regimen.parse("80 mg QW")
    with pytest.raises(RegimenError, match=r"^regimen '80 mg QW' is open-ended; pass until="):
        r.doses()
    with pytest.raises(RegimenError):
        r.to_records()
    with pytest.raises(RegimenError):
        r.total_dose()
    t, _ = r.doses(until=4 * WEEK)
    np.testing.assert_array_equal(t, [0, 168, 336, 504])  # t < until only
    assert r.total_dose(until=4 * WEEK + 1) == 5 * 80


def test_open_ended_tail_after_finite_phase() -> None:
    r = Regimen.parse("100 mg QW for 4 weeks, then 80 mg BIW")
    t, a = r.doses(until=6 * WEEK)
    np.testing.assert_array_equal(t, [0, 168, 336, 504, 672, 720, 840, 888])
    np.testing.assert_array_equal(a, [100] * 4 + [80] * 4)


def test_weekly_dose() -> None:
    assert Regimen.parse("80 mg BIW").weekly_dose == 160
    assert Regimen.parse("10 mg QD for 1 week").weekly_dose == 70
    assert Regimen.parse("300 mg Q3W").weekly_dose == pytest.approx(100)


# ---------------------------------------------------------------- hold / reduce
def test_hold_skips_days_15_to_21() -> None:
    r = Regimen.parse("100 mg QW for 8 weeks")
    h = r.hold(15, 22)
    t, _ = h.doses()
    np.testing.assert_array_equal(t, [0, 168, 504, 672, 840, 1008, 1176])
    assert h.total_dose() == 700
    assert h.label == "100 mg QW for 8 weeks, held days 15-21"
    assert r.doses()[0].size == 8  # original untouched


def test_hold_open_ended_biw() -> None:
    h = Regimen.parse("80 mg BIW").hold(8, 15)
    t, _ = h.doses(until=3 * WEEK)
    np.testing.assert_array_equal(t, [0, 48, 336, 384])
    assert Regimen.parse("100 mg QW").hold(15, 22).label == "100 mg QW, held days 15-21"


def test_hold_mid_week_resumes_on_schedule() -> None:
    t, _ = Regimen.parse("10 mg QD").hold(3, 5).doses(until=7 * 24)
    np.testing.assert_array_equal(t, [0, 24, 96, 120, 144])
    assert Regimen.parse("10 mg QD").hold(3, 4).label == "10 mg QD, held day 3"


def test_reduce() -> None:
    r = Regimen.parse("100 mg QW").reduce(29, 80)
    t, a = r.doses(until=8 * WEEK)
    np.testing.assert_array_equal(t, np.arange(8) * WEEK)
    np.testing.assert_array_equal(a, [100] * 4 + [80] * 4)
    assert r.total_dose(until=8 * WEEK) == 720
    assert r.label == "100 mg QW, reduced to 80 mg from day 29"


def test_hold_then_reduce_finite() -> None:
    r = Regimen.parse("80 mg BIW for 8 weeks").hold(15, 22).reduce(29, 60)
    t, a = r.doses()
    assert len(t) == 14
    np.testing.assert_array_equal(a, [80] * 4 + [80] * 2 + [60] * 8)
    assert r.total_dose() == 6 * 80 + 8 * 60
    assert r.label == "80 mg BIW for 8 weeks, held days 15-21, reduced to 60 mg from day 29"


def test_bad_hold_and_reduce_arguments() -> None:
    r = Regimen.parse("80 mg QW")
    with pytest.raises(RegimenError, match="start_day < end_day"):
        r.hold(22, 15)
    with pytest.raises(RegimenError, match="positive dose"):
        r.reduce(29, 0)


# ---------------------------------------------------------------- NONMEM records
def test_to_records_biw_compressed_to_two_rows() -> None:
    df = Regimen.parse("80 mg BIW for 4 weeks").to_records(id=7, cmt=2)
    assert list(df.columns) == ["ID", "TIME", "EVID", "AMT", "CMT", "II", "ADDL"]
    assert len(df) == 2
    assert df["TIME"].tolist() == [0.0, 48.0]
    assert df["II"].tolist() == [168.0, 168.0]
    assert df["ADDL"].tolist() == [3, 3]
    assert df["AMT"].tolist() == [80.0, 80.0]
    assert (df["ID"] == 7).all() and (df["CMT"] == 2).all() and (df["EVID"] == 1).all()


def test_to_records_phases_and_hold() -> None:
    df = Regimen.parse("100 mg QW for 4 weeks, then 80 mg QW for 8 weeks").to_records()
    assert df[["TIME", "AMT", "II", "ADDL"]].values.tolist() == [
        [0.0, 100.0, 168.0, 3],
        [672.0, 80.0, 168.0, 7],
    ]
    df = Regimen.parse("100 mg QW").hold(15, 22).to_records(until=8 * WEEK)
    assert df[["TIME", "II", "ADDL"]].values.tolist() == [[0.0, 168.0, 1], [504.0, 168.0, 4]]
    df = Regimen.parse("5 mg QD for 4 weeks").to_records()
    assert df[["TIME", "II", "ADDL"]].values.tolist() == [[0.0, 24.0, 27]]


@pytest.mark.parametrize(
    ("text", "until"),
    [
        ("80 mg BIW for 4 weeks", None),
        ("100 mg QW for 4 weeks, then 80 mg QW for 8 weeks", None),
        ("80 mg TIW", 1000.0),
        ("25 mg BID", 500.0),
        ("200 mg Q3W", 5000.0),
        ("none", None),
    ],
)
def test_round_trip(text: str, until: float | None) -> None:
    r = Regimen.parse(text)
    back = Regimen.from_records(r.to_records(until=until))
    assert_same_doses(back.doses(), r.doses(until=until))


def test_round_trip_after_hold_and_reduce() -> None:
    r = Regimen.parse("80 mg BIW").hold(15, 22).reduce(29, 60).hold(43, 50)
    df = r.to_records(until=10 * WEEK)
    back = Regimen.from_records(df)
    assert_same_doses(back.doses(), r.doses(until=10 * WEEK))
    assert len(df) < len(r.doses(until=10 * WEEK)[0])


def test_from_records_ignores_observations_and_checks_ids() -> None:
    df = pd.DataFrame(
        {
            "ID": [1, 1, 1],
            "TIME": [0.0, 2.0, 48.0],
            "EVID": [1, 0, 1],
            "AMT": [80.0, 0.0, 40.0],
            "II": [168.0, 0.0, 0.0],
            "ADDL": [1, 0, 0],
        }
    )
    t, a = Regimen.from_records(df).doses()
    np.testing.assert_array_equal(t, [0, 48, 168])
    np.testing.assert_array_equal(a, [80, 40, 80])
    two = pd.concat([df, df.assign(ID=2)])
    with pytest.raises(RegimenError, match=r"^from_records expects one ID, got 2 \(1, 2\)"):
        Regimen.from_records(two)


def test_from_records_weekly_dose() -> None:
    r = Regimen.from_records(Regimen.parse("80 mg BIW for 4 weeks").to_records())
    assert r.weekly_dose == 160


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80 mg", f"cannot parse regimen '80 mg': missing frequency after 'mg' {FREQ_HELP}"),
        (
            "mg QW",
            "cannot parse regimen 'mg QW': missing dose before 'mg' "
            "(expected '<dose> mg <freq>', e.g. '80 mg QW')",
        ),
        (
            "-5 mg QW",
            "cannot parse regimen '-5 mg QW': dose must be a positive number of mg, got '-5'",
        ),
        ("80 mg XYZ", f"cannot parse regimen '80 mg XYZ': unknown frequency 'XYZ' {FREQ_HELP}"),
        ("80 mg BIWX", f"cannot parse regimen '80 mg BIWX': unknown frequency 'BIWX' {FREQ_HELP}"),
        (
            "80 mg QW for weeks",
            "cannot parse regimen '80 mg QW for weeks': missing count in 'for weeks' "
            "(expected 'for <N> weeks|days|doses|cycles')",
        ),
        (
            "80 mg QW for 0 weeks",
            "cannot parse regimen '80 mg QW for 0 weeks': duration must be positive, "
            "got 'for 0 weeks'",
        ),
        ("", "cannot parse regimen '': empty text (expected '<dose> mg <freq>' or 'none')"),
        (
            "80 mg QW, then",
            "cannot parse regimen '80 mg QW, then': nothing after 'then' "
            "(expected phase 2 as '<dose> mg <freq>', e.g. '80 mg QW')",
        ),
        (
            "80 QW",
            "cannot parse regimen '80 QW': missing 'mg' in '80 QW' "
            "(expected '<dose> mg <freq>', e.g. '80 mg QW')",
        ),
        (
            "80 mg QW 4 weeks",
            "cannot parse regimen '80 mg QW 4 weeks': unexpected '4 weeks' after the frequency "
            "(expected 'for <N> weeks|days|doses|cycles')",
        ),
        (
            "80 mg QW for 4 fortnights",
            "cannot parse regimen '80 mg QW for 4 fortnights': unknown duration unit 'fortnights' "
            "(expected weeks, days, doses or cycles)",
        ),
        (
            "80 mg QW, then 40 mg QW",
            "cannot parse regimen '80 mg QW, then 40 mg QW': phase 1 '80 mg QW' has no duration, "
            "so phase 2 never starts (add 'for <N> weeks')",
        ),
        (
            "80 mg Q0H",
            "cannot parse regimen '80 mg Q0H': frequency interval must be positive, got 'Q0H'",
        ),
        (
            "80 mg QW for 2.5 doses",
            "cannot parse regimen '80 mg QW for 2.5 doses': number of doses must be a whole "
            "number, got '2.5'",
        ),
        (
            "80 mg QW for 4 weeks daily",
            "cannot parse regimen '80 mg QW for 4 weeks daily': unexpected 'daily' after "
            "'for 4 weeks'",
        ),
    ],
)
def test_bad_strings(text: str, message: str) -> None:
    with pytest.raises(RegimenError) as info:
        Regimen.parse(text)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- properties
FREQS = {
    "QD": (24.0, 1),
    "BID": (12.0, 1),
    "QW": (168.0, 1),
    "BIW": (168.0, 2),
    "TIW": (168.0, 3),
    "Q2W": (336.0, 1),
    "Q3W": (504.0, 1),
    "Q4W": (672.0, 1),
    "Q8H": (8.0, 1),
    "Q2D": (48.0, 1),
}
phase_st = st.tuples(
    st.integers(1, 20_000).map(lambda x: x / 10),  # dose, mg
    st.sampled_from(sorted(FREQS)),
    st.integers(1, 12),
    st.sampled_from(["weeks", "days", "doses", "cycles"]),
)


def phase_text(p: tuple[float, str, int, str]) -> str:
    dose, freq, n, unit = p
    return f"{dose:g} mg {freq} for {n} {unit}"


@settings(max_examples=150, deadline=None)
@given(
    phases=st.lists(phase_st, min_size=1, max_size=3),
    open_tail=st.booleans(),
    hold=st.none() | st.tuples(st.integers(1, 60), st.integers(1, 21)),
    reduce=st.none() | st.tuples(st.integers(1, 90), st.integers(1, 500)),
    until_days=st.integers(1, 120),
)
def test_round_trip_property(phases, open_tail, hold, reduce, until_days) -> None:
    text = ", then ".join(phase_text(p) for p in phases)
    if open_tail:
        text = text.rsplit(" for ", 1)[0]  # last phase becomes open-ended
    r = Regimen.parse(text)
    if hold is not None:
        r = r.hold(hold[0], hold[0] + hold[1])
    if reduce is not None:
        r = r.reduce(reduce[0], float(reduce[1]))
    until = until_days * 24.0
    expected = r.doses(until=until)
    df = r.to_records(until=until)
    assert (df["ADDL"] >= 0).all() and len(df) <= len(expected[0])
    assert_same_doses(Regimen.from_records(df).doses(), expected)
    assert np.all(np.diff(expected[0]) >= 0) and np.all(expected[0] < until)


@settings(max_examples=100, deadline=None)
@given(phase=phase_st)
def test_single_phase_counts_and_compression(phase: tuple[float, str, int, str]) -> None:
    dose, freq, n, unit = phase
    period, per_cycle = FREQS[freq]
    r = Regimen.parse(phase_text(phase))
    t, a = r.doses()
    if unit == "doses":
        assert len(t) == n
    elif unit == "cycles":
        assert len(t) == n * per_cycle
    hours = {"weeks": 168.0 * n, "days": 24.0 * n}.get(unit)
    if hours is not None:
        assert np.all(t < hours) and len(t) >= 1
    assert np.all(a == dose)
    assert r.total_dose() == pytest.approx(dose * len(t))
    assert r.weekly_dose == pytest.approx(dose * per_cycle * 168.0 / period)
    assert len(r.to_records()) <= per_cycle
