"""Property tests of the simulator over random parameters, doses and observation times.

Linear compartment models must satisfy, whatever the parameters and dosing history:

* superposition: simulating doses A and B together equals sim(A) + sim(B);
* dose linearity: scaling every AMT (and RATE, so durations stay) by s scales the profile;
* mass balance: with an ELIM compartment collecting CL/V·CENTRAL, the sum of all amounts is
  the amount given so far (F × AMT for boluses, the infused part of infusions);
* time-shift invariance: shifting every TIME by c shifts the profile;
* non-negativity: amounts and concentrations are never negative (and, without steady-state
  records, never more than what was given).

Times, lags, II and shifts are multiples of 0.25 h, which binary floating point represents
exactly, so a dose lagged onto an observation time stays exactly on it after a shift (a
one-ulp difference would flip the order of a bolus and an observation: a real discontinuity).

Tolerances: every comparison is relative 1e-8 with an absolute floor of 1e-12 × ``scale``,
where ``scale`` is the larger of the total amount dosed and the largest compared value (an
upper bound on every amount, and on concentrations × V). The closed form is linear in the
doses up to round-off, but values that are 0 in exact arithmetic (CENTRAL at the instant of an
oral dose, states before a lagged dose) come out as cancellation residue ~1e-16 × scale, for
which a relative comparison is meaningless. Relative 1e-8, not 1e-9: with eigenvalues only
1.2× apart Sylvester's formula cancels between modes of size ~1/(gap)^(m−1), and
round-off up to 1.1e-9 was seen (mass balance, four modes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sympy as sp
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pkpd.model import MODELS_DIR, Model, load_model, parse_model
from pkpd.simulation import simulate

RTOL, ATOL_FRAC = 1e-8, 1e-12
SETTINGS = settings(max_examples=40, deadline=None)
GRID = 0.25  # h; exactly representable

STD_COLS = ("ID", "TIME", "EVID", "AMT", "CMT", "RATE", "II", "ADDL", "SS")


# ----------------------------------------------------------------------------------- models
def _with_amounts_and_dosing(text: str, states: tuple[str, ...]) -> str:
    """Model text (``[outputs]`` last) + outputs A_<state> and TOTAL, parameters TLAG/FBIO
    bound to ALAG1/F1."""
    sections = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[")]
    assert sections[-1] == "[outputs]"
    text = text.rstrip("\n") + "\n" + "".join(f'A_{s} = "{s}"\n' for s in states)
    text += f'TOTAL = "{" + ".join(states)}"\n'
    text = text.replace("[parameters]\n", "[parameters]\n"
                        'TLAG = { value = 0.0, unit = "h" }\n'
                        'FBIO = { value = 1.0, unit = "-" }\n', 1)
    return text + '\n[dosing]\nALAG1 = "TLAG"\nF1 = "FBIO"\n'


def standard(name: str) -> Model:
    text = (MODELS_DIR / f"{name}.toml").read_text()
    return parse_model(_with_amounts_and_dosing(text, load_model(name).states),
                       f"<{name}+props>")


def with_elim(name: str, central: str, cl_over_v: str) -> Model:
    """A standard model plus ELIM (cmt 9) accumulating what CENTRAL eliminates."""
    text = (MODELS_DIR / f"{name}.toml").read_text()
    text = text.replace("[odes]\n", f'[odes]\nELIM = "{cl_over_v}*{central}"\n', 1)
    text = text.replace("[compartments]\n", "[compartments]\n"
                        'ELIM = { cmt = 9, unit = "mg", description = "eliminated" }\n', 1)
    states = (*load_model(name).states, "ELIM")
    return parse_model(_with_amounts_and_dosing(text, states), f"<{name}+elim>")


@dataclass(frozen=True)
class Spec:
    model: Model
    central: str  # central compartment (CP = CENTRAL/volume)
    volume: str
    depot: bool
    ranges: dict[str, tuple[float, float]]


def _ranges(*names: str) -> dict[str, tuple[float, float]]:
    table = {"CL": (0.3, 20.0), "V": (5.0, 150.0), "V1": (5.0, 100.0), "V2": (5.0, 150.0),
             "V3": (5.0, 200.0), "V4": (10.0, 300.0), "Q": (0.3, 25.0), "Q3": (0.3, 25.0),
             "Q4": (0.1, 10.0)}
    return {n: table[n] for n in names}


STANDARD = {
    "1cmt_iv": Spec(standard("pk_1cmt_iv"), "CENTRAL", "V", False, _ranges("CL", "V")),
    "1cmt_oral": Spec(standard("pk_1cmt_oral"), "CENTRAL", "V", True, _ranges("CL", "V")),
    "2cmt_iv": Spec(standard("pk_2cmt_iv"), "CENTRAL", "V1", False,
                    _ranges("CL", "V1", "Q", "V2")),
    "2cmt_oral": Spec(standard("pk_2cmt_oral"), "CENTRAL", "V2", True,
                      _ranges("CL", "V2", "Q", "V3")),
    "3cmt_oral": Spec(standard("pk_3cmt_oral"), "CENTRAL", "V2", True,
                      _ranges("CL", "V2", "Q3", "V3", "Q4", "V4")),
}
ELIM = {
    "1cmt_iv": Spec(with_elim("pk_1cmt_iv", "CENTRAL", "CL/V"), "CENTRAL", "V", False,
                    _ranges("CL", "V")),
    "2cmt_oral": Spec(with_elim("pk_2cmt_oral", "CENTRAL", "CL/V2"), "CENTRAL", "V2", True,
                      _ranges("CL", "V2", "Q", "V3")),
    "3cmt_oral": Spec(with_elim("pk_3cmt_oral", "CENTRAL", "CL/V2"), "CENTRAL", "V2", True,
                      _ranges("CL", "V2", "Q3", "V3", "Q4", "V4")),
}


def system_matrix(model: Model, params: dict[str, float]) -> np.ndarray:
    lin = model.linear
    assert lin is not None
    values = {sp.Symbol(k, real=True): v for k, v in (model.theta | params).items()}
    return np.array(lin.A.subs(values), dtype=float)


# ------------------------------------------------------------------------------ strategies
@dataclass(frozen=True)
class Case:
    spec: Spec
    params: dict[str, float]
    doses: list[dict]
    obs_times: list[float]

    @property
    def model(self) -> Model:
        return self.spec.model


def grid(lo: float, hi: float):
    return st.integers(int(lo / GRID), int(hi / GRID)).map(lambda k: k * GRID)


def log_uniform(lo: float, hi: float):
    return st.floats(math.log(lo), math.log(hi)).map(math.exp)


@st.composite
def parameters(draw, spec: Spec) -> dict[str, float]:
    params = {k: draw(log_uniform(lo, hi)) for k, (lo, hi) in spec.ranges.items()}
    A = system_matrix(spec.model, params | {"KA": 1.0} if spec.depot else params)
    # disposition eigenvalues: everything but the depot (state 0) and ELIM (λ = 0)
    keep = [i for i, s in enumerate(spec.model.states) if s not in ("DEPOT", "ELIM")]
    rates = np.sort(-np.linalg.eigvals(A[np.ix_(keep, keep)]).real)
    if spec.depot:  # KA at least 1.2× away from every disposition rate
        ratio = draw(st.floats(1.2, 10.0))
        params["KA"] = rates[-1] * ratio if draw(st.booleans()) else rates[0] / ratio
        rates = np.sort(np.r_[rates, params["KA"]])
    assume(np.all(rates[1:] / rates[:-1] >= 1.2))  # well separated eigenvalues
    params["TLAG"] = draw(st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.75]))
    params["FBIO"] = draw(st.floats(0.2, 1.0))
    return params


@st.composite
def dose(draw, spec: Spec, ss_values: tuple[int, ...]) -> dict:
    central = next(c.cmt for c in spec.model.compartments if c.name == spec.central)
    amt = draw(st.floats(1.0, 500.0))
    d = {"TIME": draw(grid(0.0, 48.0)), "AMT": amt, "CMT": draw(st.sampled_from([1, central])),
         "EVID": 1}
    if draw(st.booleans()):  # zero-order infusion, duration 0.25 to 12 h
        d["RATE"] = amt / draw(st.floats(0.25, 12.0))
    addl = draw(st.integers(0, 3))
    ss = draw(st.sampled_from(ss_values))
    if addl or ss:
        d["II"] = draw(grid(2.0, 24.0))
        d["ADDL"] = addl
    d["SS"] = ss
    return d


@st.composite
def cases(draw, specs: dict[str, Spec], ss_values: tuple[int, ...] = (0,),
          max_doses: int = 4) -> Case:
    spec = specs[draw(st.sampled_from(sorted(specs)))]
    params = draw(parameters(spec))
    doses = draw(st.lists(dose(spec, ss_values), min_size=1, max_size=max_doses))
    # observations anywhere, and just after (lagged) doses and ADDL copies, where events are
    starts = sorted({d["TIME"] + k * d.get("II", 0.0) + lag for d in doses
                     for k in range(int(d.get("ADDL", 0)) + 1)
                     for lag in (0.0, params["TLAG"])})
    near = st.tuples(st.sampled_from(starts), grid(0.0, 2.0)).map(sum)
    obs_times = draw(st.lists(st.one_of(grid(0.0, 96.0), near), min_size=1, max_size=12))
    return Case(spec, params, doses, obs_times)


# --------------------------------------------------------------------------------- helpers
def dataset(doses: list[dict], obs_times: list[float], shift: float = 0.0) -> pd.DataFrame:
    """Records sorted by time; at equal times doses (in list order) come before observations."""
    rows = [(d["TIME"], 0, i, d) for i, d in enumerate(doses)]
    rows += [(t, 1, i, {"TIME": t, "EVID": 0}) for i, t in enumerate(obs_times)]
    rows.sort(key=lambda r: r[:3])
    out = []
    for *_, r in rows:
        rec = {c: r.get(c, 0) for c in STD_COLS} | {"ID": 1}
        rec["TIME"] = r["TIME"] + shift
        out.append(rec)
    return pd.DataFrame(out)


def observed(case: Case, doses: list[dict] | None = None, *, shift: float = 0.0,
             method: str = "auto") -> pd.DataFrame:
    """Outputs at the observation records (in time order)."""
    df = dataset(case.doses if doses is None else doses, case.obs_times, shift)
    out = simulate(case.model, df, params=case.params, method=method)
    return out[out["EVID"] == 0].reset_index(drop=True)


def total_dose(doses: list[dict]) -> float:
    return float(sum(d["AMT"] * (1 + d.get("ADDL", 0)) for d in doses))


def assert_close(actual: pd.DataFrame, desired: pd.DataFrame, model: Model, scale: float,
                 what: str) -> None:
    for col in model.outputs:
        a, d = actual[col].to_numpy(float), desired[col].to_numpy(float)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(d)), f"{what} {col}: not finite"
        floor = ATOL_FRAC * max(scale, float(np.max(np.abs(d))))
        np.testing.assert_allclose(a, d, rtol=RTOL, atol=floor, err_msg=f"{what}: {col}")


def given_so_far(case: Case, t: float) -> float:
    """Amount that has entered the system by time t (F × AMT, lag, ADDL, infusions)."""
    f, lag = case.params["FBIO"], case.params["TLAG"]
    total = 0.0
    for d in case.doses:
        first = d["CMT"] == 1  # ALAG1 and F1 apply to doses into cmt 1 only
        fd, ld = (f, lag) if first else (1.0, 0.0)
        for k in range(int(d.get("ADDL", 0)) + 1):
            start = d["TIME"] + k * d.get("II", 0.0) + ld
            amount = fd * d["AMT"]
            rate = d.get("RATE", 0.0)
            if rate > 0:  # F changes the duration at a given rate
                total += rate * min(max(t - start, 0.0), amount / rate)
            elif t >= start:
                total += amount
    return total


# ------------------------------------------------------------------------------ properties
@SETTINGS
@given(case=cases(STANDARD, ss_values=(0, 0, 2)), split=st.data())
def test_superposition(case: Case, split) -> None:
    """sim(A ∪ B) = sim(A) + sim(B), for any split of the doses (SS=2 doses included)."""
    in_a = split.draw(st.lists(st.booleans(), min_size=len(case.doses),
                               max_size=len(case.doses)))
    a = [d for d, x in zip(case.doses, in_a, strict=True) if x]
    b = [d for d, x in zip(case.doses, in_a, strict=True) if not x]
    both = observed(case)
    parts = [observed(case, part) for part in (a, b) if part]
    summed = parts[0].copy()
    for p in parts[1:]:
        for col in case.model.outputs:
            summed[col] = summed[col] + p[col]
    assert_close(both, summed, case.model, total_dose(case.doses), "superposition")


@SETTINGS
@given(case=cases(STANDARD, ss_values=(0, 0, 1, 2)), factor=st.floats(0.05, 20.0))
def test_dose_linearity(case: Case, factor: float) -> None:
    """factor × AMT (and × RATE, so infusion durations are unchanged) → factor × outputs;
    also with SS=1 and SS=2 records."""
    scaled = [d | {"AMT": d["AMT"] * factor, "RATE": d.get("RATE", 0.0) * factor}
              for d in case.doses]
    base = observed(case)
    big = observed(case, scaled)
    expected = base.copy()
    for col in case.model.outputs:
        expected[col] = base[col] * factor
    assert_close(big, expected, case.model, total_dose(scaled), "dose linearity")


@settings(max_examples=30, deadline=None)
@given(case=cases(ELIM), method=st.sampled_from(["auto", "expm"]))
def test_mass_balance_with_elim_compartment(case: Case, method: str) -> None:
    """Sum of all amounts (ELIM included) = amount given so far, at every observation.

    "auto" is the closed form except where its product formula would lose digits (rates
    spanning > ~10⁴, see tests/test_kernels.py), where it switches to the matrix exponential.
    """
    out = observed(case, method=method)
    expected = np.array([given_so_far(case, t) for t in sorted(case.obs_times)])
    total = out["TOTAL"].to_numpy()
    floor = ATOL_FRAC * total_dose(case.doses)
    np.testing.assert_allclose(total, expected, rtol=RTOL, atol=floor)
    states = [f"A_{s}" for s in case.model.states]
    np.testing.assert_allclose(out[states].sum(axis=1).to_numpy(), total, rtol=1e-12,
                               atol=floor)
    # what left CENTRAL is in ELIM: non-decreasing over time
    assert np.all(np.diff(out["A_ELIM"].to_numpy()) >= -floor)


@SETTINGS
@given(case=cases(STANDARD, ss_values=(0, 0, 1, 2)), shift=grid(0.25, 500.0))
def test_time_shift_invariance(case: Case, shift: float) -> None:
    """Shifting every TIME by c gives the same outputs at the shifted records."""
    base = observed(case)
    moved = observed(case, shift=shift)
    np.testing.assert_array_equal(moved["TIME"].to_numpy(), base["TIME"].to_numpy() + shift)
    assert_close(moved, base, case.model, total_dose(case.doses), "time shift")


@SETTINGS
@given(case=cases(STANDARD, ss_values=(0, 0, 1, 2)))
def test_non_negativity(case: Case) -> None:
    """Amounts and concentrations are ≥ 0 (down to round-off); without SS records the sum of
    amounts never exceeds what was given (elimination only removes drug)."""
    out = observed(case)
    scale = max(total_dose(case.doses),
                float(out[[f"A_{s}" for s in case.model.states]].abs().to_numpy().max()))
    floor = ATOL_FRAC * scale
    for col in case.model.outputs:
        values = out[col].to_numpy()
        lower = -floor / (case.params[case.spec.volume] if col == "CP" else 1.0)
        assert np.all(values >= lower), f"{col} negative: {values.min()}"
    if all(d["SS"] == 0 for d in case.doses):
        given = np.array([given_so_far(case, t) for t in sorted(case.obs_times)])
        assert np.all(out["TOTAL"].to_numpy() <= given * (1 + RTOL) + floor)
