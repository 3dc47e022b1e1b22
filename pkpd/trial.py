"""Virtual SMM trial of a selinexor regimen: week-by-week simulation with the label's dose
modification, then per-patient endpoints and a summary by risk group.

The model is ``models/selinexor_smm.toml`` (PK → XPO1 → clone burden/M-spike/sFLC →
progression and SRE hazards; platelets; adverse-event hazards). Patients come from
:func:`pkpd.population.smm_population` (or a relapsed/refractory myeloma platelet baseline
with ``population="rrmm"`` for calibration against the label's thrombocytopenia rates).

Dose modification (label, domain.md §3.5): doses are held while platelets are < 50 × 10⁹/L
after a grade 4 count (< 25 × 10⁹/L), then restarted one level lower; below the last level
treatment stops. Ladders: QW 100 → 80 → 60 → 40 mg → stop; 80 mg BIW → 100 mg QW → 80 → 60
mg QW → stop. Decisions use the daily platelet counts of the week just simulated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .endpoints import (
    background_mortality_hazard,
    event_times,
    imwg_progression,
    kaplan_meier,
    wilson_ci,
)
from .model import Model, load_model
from .population import smm_population
from .regimen import Regimen, RegimenError
from .simulation import Course, individual_parameters, sample_etas
from .solvers import dose_rule
from .solvers.periodic import Pattern, PeriodicSolver, Unsupported

__all__ = ["TrialResult", "dose_ladder", "run_trial"]

WEEK = 168.0
AES = ("NAUSEA", "FATIGUE", "APPETITE", "HYPONATREMIA")
_QW = [(100.0, (0.0,)), (80.0, (0.0,)), (60.0, (0.0,)), (40.0, (0.0,))]
_BIW = [(80.0, (0.0, 48.0)), (100.0, (0.0,)), (80.0, (0.0,)), (60.0, (0.0,))]
HAZARDS = ("HPROG", "HSRE", *(f"H_{a}_G3" for a in AES))
HOLD_BELOW, RESUME_AT = 25.0, 50.0  # platelets, 10⁹/L: hold at grade 4, restart at ≥ 50


@dataclass(frozen=True)
class TrialResult:
    """Per-patient endpoints, summary by risk group and weekly trajectories for plots."""

    patients: pd.DataFrame
    summary: pd.DataFrame
    weeks: np.ndarray  # h
    mspike: np.ndarray  # (n, n_weeks + 1) g/dL
    platelets: np.ndarray  # (n, n_weeks + 1) 10^9/L (weekly minimum)


def dose_ladder(regimen: str) -> list[tuple[float, tuple[float, ...]]]:
    """The label's levels (mg, dose times within the week in h) from the given regimen down;
    empty for "none"."""
    text = " ".join(regimen.lower().split())
    if text == "none":
        return []
    reg = Regimen.parse(regimen)
    if reg.open_ended is False:
        raise RegimenError(f"regimen {regimen!r}: give a continuous regimen (no 'for'); the "
                           "trial runs it for the whole follow-up")
    times, amounts = reg.doses(until=WEEK)
    start = (float(amounts[0]), tuple(float(t) for t in times)) if len(times) else None
    for ladder in (_QW, _BIW):
        if start in ladder:
            return ladder[ladder.index(start):]
    if start is not None and start[1] == (0.0,):  # another weekly dose: the QW ladder below it
        return [start] + [lvl for lvl in _QW if lvl[0] < start[0]]
    raise RegimenError(f"regimen {regimen!r}: dose modification is defined for once-weekly "
                       "(QW) regimens and 80 mg BIW")


def run_trial(regimen: str, *, risk: str | list[str] | None = "intermediate,high",
              n: int = 2000, years: float = 2.0, seed: int = 1, population: str = "smm",
              model: Model | str = "selinexor_smm",
              theta: Mapping[str, float | np.ndarray] | None = None,
              progress: Callable[[int, int], None] | None = None,
              engine: str = "periodic", summarise: bool = True) -> TrialResult:
    """Simulate ``n`` patients on ``regimen`` for ``years``; same seed ⇒ same result (and,
    across regimens, the same patients and random event times: common random numbers).

    ``theta`` overrides typical values, one value or one per patient (e.g. parameter draws of
    a posterior or of the model files' assumption ranges, each shared by a block of patients);
    ``omega_<P>`` in it sets the SD of P's log-normal IIV (a fit's ω), rescaling the same
    standard-normal draws.

    ``engine``: "periodic" (default) steps each week with per-patient maps of each dose level,
    the weekly dose decisions inside its compiled per-patient loop
    (:mod:`pkpd.solvers.periodic`: 15-19× faster than "ode" in ``benchmarks/bench_trial.py``;
    states within 0.5 % of the reference, the platelet chain within 2 % also at grade 4
    counts), falling back, with a warning, to "ode" (the error-controlled compiled solver,
    rtol 1e-4) when the model does not have that structure; patients whose doses are not
    eliminated within 4 weeks (the periodic solver's assumption) are simulated with "ode".

    ``summarise=False`` leaves :attr:`TrialResult.summary` empty (for callers that only need
    the per-patient table, e.g. :func:`pkpd.compare.compare`).
    """
    if engine not in ("periodic", "ode"):
        raise ValueError(f"engine must be 'periodic' or 'ode', got {engine!r}")
    if engine == "periodic":
        try:
            return _run(regimen, risk, n, years, seed, population, model, theta, progress,
                        "periodic", summarise)
        except Unsupported as exc:  # e.g. a dose not eliminated within the week
            warnings.warn(f"run_trial: the periodic engine does not apply ({exc}); using the "
                          "ode engine", stacklevel=2)
    return _run(regimen, risk, n, years, seed, population, model, theta, progress, "ode",
                summarise)


def _run(regimen, risk, n, years, seed, population, model, theta, progress, engine,
         summarise=True):
    if population not in ("smm", "rrmm"):
        raise ValueError(f"population must be 'smm' or 'rrmm', got {population!r}")
    if years <= 0 or years > 10:
        raise ValueError(f"years must be in (0, 10], got {years}")
    m = load_model(model) if isinstance(model, str) else model
    ladder = dose_ladder(regimen)
    rng = np.random.default_rng(seed)
    pop = smm_population(n, risk=risk, seed=int(rng.integers(2**31)))
    # platelet baseline: SMM patients normal; relapsed/refractory myeloma lower (assumption)
    median, logsd = (240.0, 0.20) if population == "smm" else (150.0, 0.35)
    pop["PLT0"] = np.clip(median * np.exp(logsd * rng.standard_normal(n)), 60.0, 450.0)
    covs = {k: pop[k].to_numpy(float) if k in pop else np.full(n, c.default)
            for k, c in m.covariates.items()}
    eta = sample_etas(m, n, np.random.default_rng(int(rng.integers(2**31))))
    if theta is not None:
        unknown = sorted(k for k in theta if k.removeprefix("omega_") not in m.parameters)
        if unknown:
            raise ValueError(f"{m.name}: unknown parameter(s) {', '.join(unknown)}")
        theta = {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)) for k, v in theta.items()}
        omega = {k.removeprefix("omega_"): theta.pop(k) for k in list(theta)
                 if k.startswith("omega_")}
        for k, sd in sorted(omega.items()):  # the same standard-normal draws, rescaled
            w2 = m.parameters[k].omega2
            z = (eta[k] / np.sqrt(w2) if w2 > 0 else np.random.default_rng(
                [seed, sorted(m.parameters).index(k)]).standard_normal(n))
            eta[k] = sd * z
    ind = individual_parameters(m, covs, theta=theta, eta=eta).params

    n_weeks = int(round(years * 52))
    planned = ladder[0][0] * len(ladder[0][1]) * n_weeks if ladder else 0.0
    if engine == "periodic":
        weekly, hazards, plt_min, inh_sum, delivered, reduced_day = _weeks_periodic(
            m, ind, covs, ladder, n, n_weeks, progress)
    else:
        weekly, hazards, plt_min, inh_sum, delivered, reduced_day = _weeks_ode(
            m, ind, covs, ladder, n, n_weeks, progress)

    weeks = np.arange(n_weeks + 1) * WEEK
    patients = _endpoints(pop, weeks, weekly, hazards, plt_min, np.random.default_rng(
        int(rng.integers(2**31))))
    patients["DOSE_INTENSITY"] = delivered / planned if planned else 0.0
    patients["XPO1_INH_MEAN"] = inh_sum / (7 * n_weeks)
    patients["REDUCTION_DAYS"] = reduced_day
    # IMWG biochemical progression on 4-weekly M-spike assessments (model-predicted values)
    visits = np.arange(0, n_weeks + 1, 4)
    bio_t, bio = imwg_progression(weeks[visits] / 24.0, weekly["MSPIKE"][:, visits])
    patients["BIOCHEM_PROG"] = bio
    patients["BIOCHEM_PROG_DAYS"] = bio_t
    summary = _summary(patients, years) if summarise else pd.DataFrame()
    return TrialResult(patients, summary, weeks, weekly["MSPIKE"], weekly["PLT"])


def _take(d: Mapping[str, np.ndarray], rows: np.ndarray, n: int) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(np.asarray(v), (n,))[rows] for k, v in d.items()}


def _merge(n: int, rows: np.ndarray, a: tuple, b: tuple) -> tuple:
    """The per-patient results of _weeks_* for patients ``rows`` (a) and the others (b)."""
    def put(x, y):
        if isinstance(x, dict):
            return {k: put(x[k], y[k]) for k in x}
        out = np.empty((n, *x.shape[1:]), dtype=np.result_type(x, y))
        out[rows], out[~rows] = x, y
        return out

    return tuple(put(x, y) for x, y in zip(a, b, strict=True))


def _weeks_ode(m, ind, covs, ladder, n, n_weeks, progress):
    """The weekly loop with the label's dose modification on the compiled ODE solver."""
    course = Course(m, ind, covs, rtol=1e-4, atol=1e-8)
    level = np.zeros(n, np.int64)
    held = np.zeros(n, bool)
    stopped = np.full(n, not ladder)
    delivered = np.zeros(n)  # mg per patient
    weekly = {k: np.empty((n, n_weeks + 1)) for k in ("MSPIKE", "SFLC", "PLT")}
    hazards = {k: np.zeros((n, n_weeks + 1)) for k in HAZARDS}
    plt_min = np.full(n, np.inf)
    inh_sum = np.zeros(n)  # Σ daily XPO1 inhibition (fraction)
    reduced_day = np.full(n, np.nan)  # restart one level lower (or stop), days
    index = {s: i for i, s in enumerate(m.states)}
    first = dict(zip(m.states, course.x.T, strict=True))
    weekly["MSPIKE"][:, 0] = first["MPROT"]
    weekly["SFLC"][:, 0] = first["FLC"]
    weekly["PLT"][:, 0] = first["CIRC"]
    day = np.arange(0.0, WEEK + 1, 24.0)
    for w in range(n_weeks):
        t0 = w * WEEK
        doses = []  # (patients, time h, amount mg)
        dosing = ~held & ~stopped
        if ladder:
            for lv, (dose, offsets) in enumerate(ladder):
                who = np.flatnonzero(dosing & (level == lv))
                doses += [(who, np.full(len(who), t0 + o), np.full(len(who), dose))
                          for o in offsets]
                delivered[who] += dose * len(offsets)
        subj, times, amts = (np.concatenate([d[i] for d in doses]) if doses
                             else np.zeros(0) for i in range(3))
        order = np.lexsort((times, subj))
        amounts = course.run(t0, t0 + day, subj[order].astype(int), times[order],
                             amts[order])
        end = {k: amounts[index[k], -1] for k in ("MPROT", "FLC", *hazards)}
        bound = amounts[index["BOUND"], 1:].T
        circ = amounts[index["CIRC"]].T
        inh_sum += bound.sum(axis=1)  # XPO1_INH = BOUND
        plt_week = circ.min(axis=1)
        plt_min = np.minimum(plt_min, plt_week)
        weekly["MSPIKE"][:, w + 1] = end["MPROT"]
        weekly["SFLC"][:, w + 1] = end["FLC"]
        weekly["PLT"][:, w + 1] = plt_week
        for k in hazards:
            hazards[k][:, w + 1] = end[k]
        # label: hold at grade 4 until ≥ 50, then one level lower (stop below the ladder)
        resume = dose_rule.apply(plt_week, circ[:, -1], held, level, stopped, len(ladder),
                                 HOLD_BELOW, RESUME_AT)
        reduced_day[resume & np.isnan(reduced_day)] = (w + 1) * 7.0
        if progress is not None:
            progress(w + 1, n_weeks)
    return weekly, hazards, plt_min, inh_sum, delivered, reduced_day


def _weeks_periodic(m, ind, covs, ladder, n, n_weeks, progress):
    """The same loop on the periodic solver: the weekly decisions run inside its compiled
    per-patient loop (:meth:`PeriodicSolver.run_ladder`), in parts of a few weeks when
    ``progress`` is reported. The maps follow the doses of up to 3 earlier weeks as the
    slowest patient's elimination needs; patients whose doses do not die out even then (e.g.
    a very low clearance) are simulated with the ode engine."""
    patterns = [Pattern(offsets, (dose,) * len(offsets)) for dose, offsets in ladder]
    solver = PeriodicSolver(m, ind, covs, [*patterns, Pattern()], period=WEEK, memory=None)
    ok = solver.independent()
    if not ok.all():
        if not ok.any():
            solver._check_carry(*solver._doses(np.full(n, -1), np.zeros(n, int)),
                                np.arange(n))  # raises Unsupported: all patients
        return _merge(n, ok, _weeks_periodic(m, _take(ind, ok, n), _take(covs, ok, n), ladder,
                                             int(ok.sum()), n_weeks, progress),
                      _weeks_ode(m, _take(ind, ~ok, n), _take(covs, ~ok, n), ladder,
                                 int((~ok).sum()), n_weeks, None))
    first = dict(zip(m.states, solver.x, strict=True))
    record = ("MPROT", "FLC", *HAZARDS)
    rec = np.empty((n, n_weeks + 1, len(record)))
    low = np.empty((n, n_weeks + 1))
    which = np.empty((n, n_weeks), np.int64)
    rec[:, 0] = np.column_stack([first[k] for k in record])
    low[:, 0] = first["CIRC"]
    inh_sum = np.zeros(n)
    state = None
    part = n_weeks if progress is None else max(1, min(4, n_weeks))
    for w0 in range(0, n_weeks, part):
        k = min(part, n_weeks - w0)
        r = solver.run_ladder(range(len(ladder)), k, off=len(ladder), monitor="CIRC",
                              samples=np.arange(24.0, WEEK + 1, 24.0), hold_below=HOLD_BELOW,
                              resume_at=RESUME_AT, record=record, accumulate="BOUND",
                              state=state)
        state = r.state
        rec[:, w0 + 1:w0 + k + 1] = r.record
        low[:, w0 + 1:w0 + k + 1] = r.low
        which[:, w0:w0 + k] = r.which
        inh_sum += r.total
        if progress is not None:
            progress(w0 + k, n_weeks)
    weekly = {"MSPIKE": rec[:, :, 0], "SFLC": rec[:, :, 1], "PLT": low}
    hazards = {k: rec[:, :, 2 + j] for j, k in enumerate(HAZARDS)}
    mg = np.array([dose * len(offsets) for dose, offsets in ladder] + [0.0])
    delivered = mg[which].sum(axis=1)
    plt_min = low[:, 1:].min(axis=1) if n_weeks else np.full(n, np.inf)
    first_resume = state.first_resume if state is not None else np.full(n, -1)
    reduced_day = np.where(first_resume >= 0, (first_resume + 1) * 7.0, np.nan)
    return weekly, hazards, plt_min, inh_sum, delivered, reduced_day


def _endpoints(pop: pd.DataFrame, weeks: np.ndarray, weekly, hazards, plt_min,
               rng: np.random.Generator) -> pd.DataFrame:
    days = weeks / 24.0
    one_year = min(int(np.searchsorted(weeks, 52 * WEEK)), len(weeks) - 1)  # or the end
    ttp, prog = event_times(days, hazards["HPROG"], rng)
    mort = background_mortality_hazard(pop["AGE"].to_numpy(), pop["SEX"].to_numpy()) / 365.25
    death_t, death = event_times(days, mort[:, None] * days[None, :], rng)
    pfs_event = ((prog == 1) | (death == 1)).astype(int)
    pfs_days = np.where(pfs_event == 1, np.minimum(np.where(prog == 1, ttp, np.inf),
                                                   np.where(death == 1, death_t, np.inf)),
                        days[-1])
    prog = np.where((death == 1) & (death_t < ttp), 0, prog)  # death first censors TTP
    ttp = np.where((death == 1) & (death_t < ttp), death_t, ttp)
    sre_t, sre = event_times(days, hazards["HSRE"], rng)
    out = pd.DataFrame({
        "ID": pop["ID"].to_numpy(), "RISK": pop["RISK"].to_numpy(),
        "PROGRESSED": prog, "TTP_DAYS": np.round(ttp, 3),
        "PFS_EVENT": pfs_event, "PFS_DAYS": np.round(pfs_days, 3),
        "MSPIKE_CHANGE_1Y": weekly["MSPIKE"][:, one_year] / weekly["MSPIKE"][:, 0] - 1,
        "SFLC_CHANGE_1Y": weekly["SFLC"][:, one_year] / weekly["SFLC"][:, 0] - 1,
        "SRE_1Y": ((sre == 1) & (sre_t <= 365.0)).astype(int),
        "PLT_GRADE_MAX": np.select([plt_min < 25, plt_min < 50, plt_min < 75, plt_min < 150],
                                   [4, 3, 2, 1], 0),
    })
    for ae in AES:
        t, e = event_times(days, hazards[f"H_{ae}_G3"], rng)
        out[f"{ae}_G3"] = ((e == 1) & (t <= 365.0)).astype(int)
    return out


def _summary(p: pd.DataFrame, years: float) -> pd.DataFrame:
    rows = []
    horizon = years * 365.0
    for group, d in [("all", p), *((g, p[p["RISK"] == g]) for g in
                                   ("low", "intermediate", "high") if (p["RISK"] == g).any())]:
        def rate(name: str, k: int, n: int, g: str = group) -> None:
            lo, hi = wilson_ci(k, n)
            rows.append({"RISK": g, "ENDPOINT": name, "N": n, "ESTIMATE": k / n,
                         "LOWER": float(lo), "UPPER": float(hi)})

        n = len(d)
        km = kaplan_meier(d["TTP_DAYS"].to_numpy(), d["PROGRESSED"].to_numpy())
        at = km[km["TIME"] <= horizon].iloc[-1]
        rows.append({"RISK": group, "ENDPOINT": f"PROGRESSION_{years:g}Y_KM", "N": n,
                     "ESTIMATE": 1 - at.SURVIVAL, "LOWER": 1 - at.UPPER,
                     "UPPER": 1 - at.LOWER})
        km = kaplan_meier(d["PFS_DAYS"].to_numpy(), d["PFS_EVENT"].to_numpy())
        at = km[km["TIME"] <= 365.0].iloc[-1]
        rows.append({"RISK": group, "ENDPOINT": "PFS_1Y_KM", "N": n, "ESTIMATE": at.SURVIVAL,
                     "LOWER": at.LOWER, "UPPER": at.UPPER})
        rate("PROGRESSED", int(d["PROGRESSED"].sum()), n)
        rate("BIOCHEM_PROG", int(d["BIOCHEM_PROG"].sum()), n)
        rate("DOSE_REDUCED", int(d["REDUCTION_DAYS"].notna().sum()), n)
        rate("PLT_GRADE3PLUS", int((d["PLT_GRADE_MAX"] >= 3).sum()), n)
        rate("SRE_1Y", int(d["SRE_1Y"].sum()), n)
        for ae in AES:
            rate(f"{ae}_G3_1Y", int(d[f"{ae}_G3"].sum()), n)
        for col in ("MSPIKE_CHANGE_1Y", "SFLC_CHANGE_1Y", "XPO1_INH_MEAN"):
            q = d[col].quantile([0.5, 0.025, 0.975]).to_numpy()
            rows.append({"RISK": group, "ENDPOINT": f"{col}_MEDIAN", "N": n,
                         "ESTIMATE": q[0], "LOWER": q[1], "UPPER": q[2]})
        rows.append({"RISK": group, "ENDPOINT": "DOSE_INTENSITY", "N": n,
                     "ESTIMATE": float(d["DOSE_INTENSITY"].mean()), "LOWER": np.nan,
                     "UPPER": np.nan})
    return pd.DataFrame(rows)
