"""The periodic-pattern solver (pkpd.solvers.periodic) against the error-controlled reference,
and the trial simulated with it against the trial simulated with the reference solver."""

from __future__ import annotations

import numpy as np
import pytest

from pkpd.model import load_model, parse_model
from pkpd.population import smm_population
from pkpd.simulation import Course, individual_parameters, sample_etas
from pkpd.solvers.periodic import Pattern, PeriodicSolver, Unsupported, split
from pkpd.trial import run_trial

WEEK = 168.0


def test_split_of_the_trial_model():
    m = load_model("selinexor_smm")
    s = split(m)
    names = lambda idx: {m.states[i] for i in idx}  # noqa: E731
    assert names(s.pk) == {"DEPOT", "CENTRAL", "PERIPHERAL"}
    # driven by the PK alone, linear in themselves: XPO1 binding and the 8 AE hazards
    assert names(s.driven) == {"BOUND"} | {f"H_{a}{g}" for a in (
        "NAUSEA", "FATIGUE", "APPETITE", "HYPONATREMIA") for g in ("", "_G3")}
    assert names(s.slow) == {"SENS", "RES", "MPROT", "FLC", "HPROG", "HSRE", "PROL",
                             "TRANSIT1", "TRANSIT2", "TRANSIT3", "CIRC"}
    assert len(s.drivers) == 1  # 1 − EMAX·CP/(EC50 + CP), the platelet proliferation factor


def _patients(m, n, seed=3):
    rng = np.random.default_rng(seed)
    pop = smm_population(n, risk="intermediate,high", seed=seed + 2)
    pop["PLT0"] = np.clip(240 * np.exp(0.2 * rng.standard_normal(n)), 60, 450)
    covs = {k: pop[k].to_numpy(float) if k in pop else np.full(n, c.default)
            for k, c in m.covariates.items()}
    return individual_parameters(m, covs, eta=sample_etas(m, n, rng)).params, covs


def test_matches_the_reference_over_half_a_year_of_changing_patterns():
    """Subjects switch between 100 mg QW, 80 mg BIW, 40 mg QW and no dose from week to week
    (as dose modification does); every state at every step end matches the reference
    (Dormand–Prince, rtol 1e-9) within 0.5 % (platelet chain 4 %: at grade 4 counts of 5-10
    × 10⁹/L while they recover in a week without a dose; the platelet nadir within 2 %). The
    tail of the previous week's doses counts: 120 h after 80 mg, ≈ 0.03 % of it still binds
    ≈ 1 % of XPO1 in the next week.
    """
    m = load_model("selinexor_smm")
    n, weeks = 24, 26
    par, covs = _patients(m, n)
    patterns = [Pattern((0.0,), (100.0,)), Pattern((0.0, 48.0), (80.0, 80.0)),
                Pattern((0.0,), (40.0,)), Pattern()]
    ps = PeriodicSolver(m, par, covs, patterns)
    ref = Course(m, par, covs, rtol=1e-9, atol=1e-12)
    rng = np.random.default_rng(1)
    col = ps.columns
    ours, theirs = [], []
    for w in range(weeks):
        which = rng.integers(0, len(patterns), n) if w % 3 else np.zeros(n, int)
        got = ps.run(which)
        subj, time, amt = [], [], []
        for i, u in enumerate(which):
            for t, a in zip(patterns[u].times, patterns[u].amounts, strict=True):
                subj.append(i)
                time.append(w * WEEK + t)
                amt.append(a)
        want = ref.run(w * WEEK, w * WEEK + np.r_[0.0, ps.times], np.array(subj, int),
                       np.array(time), np.array(amt))[:, 1:, :]  # (S, steps, n)
        ours.append(got)
        theirs.append(want)
    ours = np.concatenate(ours, axis=1)  # (n, steps, columns)
    theirs = np.concatenate(theirs, axis=1)
    index = {s: i for i, s in enumerate(m.states)}
    for name, c in col.items():
        r = theirs[index[name]].T
        err = np.abs(ours[:, :, c] - r) / np.maximum(np.abs(r), 1e-6)
        tol = 0.04 if name in ("PROL", "TRANSIT1", "TRANSIT2", "TRANSIT3", "CIRC") else 5e-3
        assert err.max() < tol, (name, err.max())
    nadir = ours[:, :, col["CIRC"]].min(axis=1) / theirs[index["CIRC"]].min(axis=0)
    assert np.abs(nadir - 1).max() < 0.02  # 1.2 % in the most sensitive subject (EC50 136)


TOY = """
[model]
name = "toy"
description = "toy"
[parameters]
CL = { value = 5.0, unit = "L/h" }
V = { value = 50.0, unit = "L" }
KA = { value = 1.0, unit = "1/h" }
K = { value = 0.1, unit = "1/h" }
[compartments]
DEPOT = { cmt = 1, unit = "mg" }
CENTRAL = { cmt = 2, unit = "mg" }
B = { cmt = 3, unit = "-" }
S = { cmt = 4, unit = "-", init = 1 }
[odes]
DEPOT = "-KA*DEPOT"
CENTRAL = "KA*DEPOT - CL/V*CENTRAL"
B = "K*CENTRAL/V*(1 - B) - K*B"
S = "{S}"
[outputs]
CP = { expr = "CENTRAL/V", unit = "mg/L" }
"""


def test_unsupported_structures_and_patterns():
    base = TOY
    ok = parse_model(base.replace("{S}", "-K*B*S"), "toy.toml")
    assert len(split(parse_model(base.replace("{S}", "K*(B - exp(CENTRAL/V))*S"), "toy.toml"))
               .drivers) == 1  # a PK-only factor is a driver
    s = split(ok)
    assert [ok.states[i] for i in s.driven] == ["B"] and [ok.states[i] for i in s.slow] == ["S"]
    with pytest.raises(Unsupported, match="not linear in B"):
        split(parse_model(base.replace("{S}", "-K*B**2*S"), "toy.toml"))
    with pytest.raises(Unsupported, match="not linear in"):
        split(parse_model(base.replace("{S}", "-K*B*S*CENTRAL/V"), "toy.toml"))  # B·CP
    par = {"CL": np.full(2, 5.0), "V": np.full(2, 50.0), "KA": np.full(2, 1.0),
           "K": np.full(2, 0.1)}
    # 5 L/h out of 50 L: after 48 h, e^{-4.8} ≈ 1 % of a dose is still there
    ps = PeriodicSolver(ok, par, {}, [Pattern((0.0,), (10.0,))], period=24.0, step=6.0)
    with pytest.raises(Unsupported, match="left in the PK"):
        ps.run(np.zeros(2, int))
    with pytest.raises(ValueError, match="one amount per dose time"):
        PeriodicSolver(ok, par, {}, [Pattern((0.0, 1.0), (10.0,))])


@pytest.mark.parametrize("regimen", ["100 mg QW", "80 mg BIW"])
def test_trial_engines_agree(regimen):
    """Same seed, same patients and event draws: the periodic engine reproduces the reference
    engine's endpoints (rates to within 1 of 300 patients whose dose decision sits on a
    platelet threshold; medians to 0.005), also for the BIW ladder (80 mg BIW → 100 mg QW →
    80 → 60 mg QW), whose dose pattern changes within the course."""
    a = run_trial(regimen, n=300, years=1.0, seed=7, engine="ode")
    b = run_trial(regimen, n=300, years=1.0, seed=7, engine="periodic")
    sa, sb = (x.summary.set_index(["RISK", "ENDPOINT"])["ESTIMATE"] for x in (a, b))
    diff = (sa - sb).abs()
    rates = [k for k in diff.index if not k[1].endswith("_MEDIAN") and "KM" not in k[1]]
    assert diff[rates].max() <= 1 / 300 + 1e-12, diff[rates].idxmax()
    medians = [k for k in diff.index if k[1].endswith("_MEDIAN")]
    assert diff[medians].max() < 5e-3, diff[medians].idxmax()
    # M-spike courses within 2 %, except where a dose decision went the other way (≤ 1 %)
    off = (np.abs(b.mspike / a.mspike - 1) > 0.02).any(axis=1)
    assert off.mean() <= 0.01, off.sum()


def _one_unusual_clearance(cl5: float, n: int = 30):
    """Half a year of 100 mg QW for n patients with CL/F 17.9 L/h except patient 5 (cl5):
    the default engine (no fallback warning for the whole trial), the same patients all at
    17.9 L/h, and the ode engine; with the mask of the usual patients."""
    import warnings

    cl = np.full(n, 17.9)
    cl[5] = cl5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "periodic engine does not apply" warning
        mixed = run_trial("100 mg QW", n=n, years=0.5, seed=3, theta={"CL": cl})
    periodic = run_trial("100 mg QW", n=n, years=0.5, seed=3, theta={"CL": np.full(n, 17.9)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ode = run_trial("100 mg QW", n=n, years=0.5, seed=3, theta={"CL": cl}, engine="ode")
    return mixed, periodic, ode, np.arange(n) != 5


def test_patients_outside_the_periodic_assumption_use_the_ode_engine():
    """A patient whose doses do not die out within two weeks (here a clearance of 0.5 L/h)
    is simulated with the ode engine, the others with the periodic one (no fallback of the
    whole trial): each patient's results are those of the engine used for them."""
    mixed, periodic, ode, rest = _one_unusual_clearance(0.5)
    assert mixed.patients[rest].equals(periodic.patients[rest])
    np.testing.assert_array_equal(mixed.mspike[rest], periodic.mspike[rest])
    assert mixed.patients.iloc[5].equals(ode.patients.iloc[5])
    np.testing.assert_array_equal(mixed.platelets[5], ode.platelets[5])


def test_memory_follows_doses_over_several_periods():
    """With ``memory=None`` the maps follow the doses of as many earlier periods (0-3) as
    elimination needs: with 6 L/h out of 50 L, ≈ 0.5 % of a dose is left after 48 h (two
    24-h periods; the default memory 1 refuses that, see above), below 1e-4 after 96 h
    (memory 3). The solution then matches the reference (0.5 %, as the trial model's
    states)."""
    ps, case = _toy_memory_none(6.0, [1.0, 1.5, 3.0])
    assert ps.memory == 3
    _check_against_reference(ps, *case, 12, 5e-3)


def _toy_memory_none(cl: float, ka: list[float]):
    """The toy model for 3 subjects (CL ``cl`` L/h of 50 L, KA ``ka`` /h) with 3 patterns of
    a 24-h period, solved with ``memory=None``: the solver and (model, parameters,
    patterns)."""
    m = parse_model(TOY.replace("{S}", "-K*B*S"), "toy.toml")
    n = len(ka)
    par = {"CL": np.full(n, cl), "V": np.full(n, 50.0), "KA": np.array(ka),
           "K": np.full(n, 0.1)}
    patterns = [Pattern((0.0,), (10.0,)), Pattern((0.0, 6.0), (5.0, 5.0)), Pattern()]
    ps = PeriodicSolver(m, par, {}, patterns, period=24.0, step=6.0, refine=(2.0,),
                        memory=None)
    return ps, (m, par, patterns)


def _check_against_reference(ps, m, par, patterns, periods: int, tol: float) -> None:
    """Random patterns per subject and period (the first one first): states B and S at the
    step ends within ``tol`` of the Dormand–Prince reference (relative to at least 1 % of
    full scale: after a few periods without a dose B is ~1e-4, and the neglected 1e-4 of a
    dose is of its size)."""
    n = len(next(iter(par.values())))
    ref = Course(m, par, {}, rtol=1e-9, atol=1e-12)
    col = ps.columns
    rng = np.random.default_rng(4)
    for w in range(periods):
        which = rng.integers(0, len(patterns), n) if w else np.zeros(n, int)
        got = ps.run(which)
        subj, time, amt = [], [], []
        for i, u in enumerate(which):
            for t, a in zip(patterns[u].times, patterns[u].amounts, strict=True):
                subj.append(i)
                time.append(w * ps.period + t)
                amt.append(a)
        want = ref.run(w * ps.period, w * ps.period + np.r_[0.0, ps.times],
                       np.array(subj, int), np.array(time), np.array(amt))[:, 1:, :]
        for name in ("B", "S"):
            r = want[m.states.index(name)].T
            err = np.abs(got[:, :, col[name]] - r) / np.maximum(np.abs(r), 1e-2)
            assert err.max() < tol, (w, name, err.max())


def test_memory_none_takes_no_earlier_period_when_doses_die_out_within_one():
    """With 50 L/h out of 50 L (e^-24 of a dose left after a 24-h period) ``memory=None``
    gives every subject memory 0: one map per pattern, whatever came before; the solution
    still matches the reference."""
    ps, case = _toy_memory_none(50.0, [2.0, 3.0, 4.0])
    assert (ps._mem == 0).all()
    _check_against_reference(ps, *case, 8, 5e-3)


def test_a_slow_eliminator_gets_a_longer_memory_alone():
    """With a clearance of 4 L/h one patient needs the doses of two earlier weeks (memory 2,
    per patient): the other patients keep memory 1 and are simulated exactly as without
    him; his course matches the ode engine (M-spike and weekly platelet minimum, 0.5 %)."""
    slow, periodic, ode, rest = _one_unusual_clearance(4.0)
    np.testing.assert_array_equal(slow.mspike[rest], periodic.mspike[rest])
    np.testing.assert_array_equal(slow.platelets[rest], periodic.platelets[rest])
    assert np.abs(slow.mspike[5] / ode.mspike[5] - 1).max() < 5e-3
    assert np.abs(slow.platelets[5] / ode.platelets[5] - 1).max() < 5e-3


@pytest.mark.parametrize("ladder", [[(100.0, (0.0,)), (80.0, (0.0,)), (60.0, (0.0,)),
                                     (40.0, (0.0,))], []])
def test_ladder_skips_settled_groups_as_if_stepping_them(ladder):
    """run_ladder steps its groups of slow states apart (platelet chain; clone burden,
    M-protein, sFLC and hazards) and does not step a group whose period start repeats the
    last one's within skip_tol (1e-6) under unchanged maps, nor steps one within the period
    where its rates barely change (e.g. the burden without drug: whole_tol 0.01): the same
    doses, holds and weekly minima as stepping every group on every step, every recorded
    state within 5e-5 (platelets and their minima within 2e-5: a skipped group keeps the
    rest of its geometric approach to the orbit, ≤ skip_tol·ρ/(1 − ρ) for a weekly ratio ρ,
    here ≤ 0.95; measured 2.6e-6), with platelet weeks
    skipped: here 12 % of the first year at 100 mg QW (66 % over two years in a 2,500-patient
    block of prior draws), 98 % without drug."""
    m = load_model("selinexor_smm")
    n, weeks = 40, 52
    par, covs = _patients(m, n, seed=5)
    patterns = [Pattern(o, (d,) * len(o)) for d, o in ladder] + [Pattern()]
    record = ("SENS", "RES", "MPROT", "FLC", "HPROG", "HSRE", "PROL", "TRANSIT1", "TRANSIT2",
              "TRANSIT3", "CIRC", "BOUND", "H_NAUSEA", "H_FATIGUE_G3")
    runs = []
    for kw in ({"skip_tol": 0.0, "whole_tol": 0.0}, {}):
        ps = PeriodicSolver(m, par, covs, patterns, memory=None, **kw)
        runs.append(ps.run_ladder(range(len(ladder)), weeks, off=len(ladder), monitor="CIRC",
                                  samples=np.arange(24.0, WEEK + 1, 24.0), hold_below=25.0,
                                  resume_at=50.0, record=record, accumulate="BOUND"))
    full, fast = runs
    assert ps.groups == [["SENS", "RES", "MPROT", "FLC", "HPROG", "HSRE"],
                         ["PROL", "TRANSIT1", "TRANSIT2", "TRANSIT3", "CIRC"]]
    np.testing.assert_array_equal(fast.which, full.which)
    np.testing.assert_allclose(fast.low, full.low, rtol=2e-5)
    np.testing.assert_allclose(fast.total, full.total, rtol=1e-12)
    for j, name in enumerate(record):
        tol = 2e-5 if name in ps.groups[1] else 5e-5
        np.testing.assert_allclose(fast.record[:, :, j], full.record[:, :, j], rtol=tol,
                                   atol=1e-12, err_msg=name)
    assert full.skipped.sum() == 0 and fast.skipped[:, 0].sum() == 0  # the burden grows
    # run_ladder composed the hazards' period maps only: run() recomposes all steps' maps
    assert np.isfinite(ps.run(np.full(n, len(ladder)))).all()
    assert fast.skipped[:, 1].mean() / weeks > (0.9 if not ladder else 0.1)


def test_dose_rule_holds_restarts_lower_and_stops():
    """The one hold-and-reduce rule both engines use (pkpd.solvers.dose_rule): a dosing
    subject below 25 is held; a held one at ≥ 50 at the period end restarts one level lower,
    and stops when no level is left; a newly held one does not restart in the same period."""
    from pkpd.solvers import dose_rule

    low = np.array([20.0, 30.0, 40.0, 40.0, 10.0, 60.0])
    end = np.array([60.0, 60.0, 55.0, 45.0, 60.0, 60.0])
    held = np.array([False, False, True, True, True, False])
    level = np.array([0, 0, 0, 1, 2, 0], np.int64)
    stopped = np.array([False, False, False, False, False, True])
    resumed = dose_rule.apply(low, end, held, level, stopped, 3, 25.0, 50.0)
    np.testing.assert_array_equal(held, [True, False, False, True, False, False])
    np.testing.assert_array_equal(level, [0, 0, 1, 1, 3, 0])
    np.testing.assert_array_equal(resumed, [False, False, True, False, True, False])
    np.testing.assert_array_equal(stopped, [False, False, False, False, True, True])
