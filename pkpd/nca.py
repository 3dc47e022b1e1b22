"""Non-compartmental analysis (NCA) of single-dose concentration-time profiles.

Conventions follow WinNonlin / PKNCA defaults:

* Cmax/Tmax: observed maximum and the *first* time it occurs.
* Clast/Tlast: last strictly positive concentration and its time.
* AUClast: from time 0 to Tlast. ``"linear-up/log-down"`` uses the linear trapezoid on
  rising or flat segments and the log trapezoid on falling segments with both
  concentrations positive; ``"linear"`` uses the linear trapezoid throughout. If a
  profile has no sample at or before time 0, a concentration of 0 at time 0 is assumed
  (pre-dose / extravascular convention; supply the time-0 sample for IV bolus data);
  samples at negative (pre-dose) times are integrated from the earliest one.
  Zero (BLQ) concentrations between positive ones are kept as zeros.
* Lambda_z: "best fit" log-linear regression on the last n >= ``min_points`` positive
  concentrations strictly after Tmax. The largest adjusted R² over all windows is found;
  among the windows with lambda_z > 0 and adjusted R² > best - 1e-4, the one with the
  most points is chosen (PKNCA ``adj.r.squared.factor``). No such window -> NaN.
* AUCinf = AUClast + Clast_obs / lambda_z; CL/F = dose / AUCinf.

Units are those of the input: concentration [C], time [T], dose [D]. AUC is [C·T],
lambda_z [1/T], half-life [T], CL/F [D/(C·T)] (e.g. mg / (ng/mL·h) = 1000 L/h).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

__all__ = ["NCA_COLUMNS", "format_table", "nca"]

#: Output columns of :func:`nca`, in order (after the ID column).
NCA_COLUMNS: tuple[str, ...] = (
    "CMAX",
    "TMAX",
    "CLAST",
    "TLAST",
    "AUCLAST",
    "LAMBDA_Z",
    "THALF",
    "RSQ_ADJ",
    "N_LAMBDA_Z",
    "AUCINF",
    "AUC_PCT_EXTRAP",
    "DOSE",
    "CL_F",
)

_AUC_METHODS = ("linear-up/log-down", "linear")
_ADJ_R2_FACTOR = 1e-4
_DOSE_EVIDS = (1, 4)
_EXACT_COLUMNS = frozenset({"ID", "N_LAMBDA_Z"})  # shown in full, not to 4 digits


def _auc(t: np.ndarray, c: np.ndarray, method: str) -> float:
    """Area under the piecewise curve through (t, c) [C·T]; t sorted ascending."""
    if t.size < 2:
        return 0.0
    t1, t2, c1, c2 = t[:-1], t[1:], c[:-1], c[1:]
    dt = t2 - t1
    seg = 0.5 * (c1 + c2) * dt
    if method == "linear-up/log-down":
        log = (c2 < c1) & (c2 > 0) & (dt > 0)
        if np.any(log):
            a, b = c1[log], c2[log]
            seg[log] = (a - b) / np.log1p((a - b) / b) * dt[log]
    return float(np.sum(seg))


def _fit_loglinear(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and adjusted R² of y = a + b·t (y = ln C); n >= 3."""
    n = t.size
    tc = t - t.mean()
    yc = y - y.mean()
    if np.ptp(t) == 0.0:
        return math.nan, math.nan
    sxx = float(tc @ tc)
    if np.ptp(y) == 0.0:  # all concentrations equal: slope 0, R² undefined
        return 0.0, math.nan
    slope = float(tc @ yc) / sxx
    syy = float(yc @ yc)
    resid = yc - slope * tc
    r2 = 1.0 - float(resid @ resid) / syy
    return slope, 1.0 - (1.0 - r2) * (n - 1) / (n - 2)


def _suffix_fits(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and adjusted R² of y ~ t over every suffix window (index n-1 = last n points).

    Vectorised with suffix sums on data shifted to the last point (well conditioned for
    suffix windows); windows with < 3 points or constant t or y give NaN.
    """
    ts, ys = (t - t[-1])[::-1], (y - y[-1])[::-1]
    n = np.arange(1, t.size + 1, dtype=float)
    st, sy = np.cumsum(ts), np.cumsum(ys)
    sxx = np.cumsum(ts * ts) - st * st / n
    syy = np.cumsum(ys * ys) - sy * sy / n
    sxy = np.cumsum(ts * ys) - st * sy / n
    y_range = np.maximum.accumulate(ys) - np.minimum.accumulate(ys)
    valid = (n >= 3) & (ts[0] - ts > 0) & (y_range > 0) & (sxx > 0) & (syy > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(valid, sxy / sxx, np.nan)
        r2 = 1.0 - (syy - sxy * slope) / syy
        adj = np.where(valid, 1.0 - (1.0 - r2) * (n - 1) / (n - 2), np.nan)
    return slope, adj


def _lambda_z(t: np.ndarray, c: np.ndarray, min_points: int) -> tuple[float, float, int]:
    """Best-fit terminal rate (lambda_z [1/T], adjusted R², n points) or (NaN, NaN, 0).

    ``t``/``c`` must already be the positive concentrations strictly after Tmax. The best
    adjusted R² is taken over all windows; windows with lambda_z > 0 within 1e-4 of it
    qualify and the one with the most points wins. The chosen window is refitted exactly.
    """
    if t.size < min_points:
        return math.nan, math.nan, 0
    slope, adj = _suffix_fits(t, np.log(c))
    slope, adj = slope[min_points - 1 :], adj[min_points - 1 :]
    if np.all(np.isnan(adj)):
        return math.nan, math.nan, 0
    best = np.nanmax(adj)
    with np.errstate(invalid="ignore"):
        ok = np.flatnonzero((-slope > 0) & (adj > best - _ADJ_R2_FACTOR))
    if ok.size == 0:
        return math.nan, math.nan, 0
    n = int(ok[-1]) + min_points
    slope_n, adj_n = _fit_loglinear(t[-n:], np.log(c[-n:]))
    if not -slope_n > 0:
        return math.nan, math.nan, 0
    return -slope_n, adj_n, n


def _profile(t: np.ndarray, c: np.ndarray, method: str, min_points: int) -> dict[str, float]:
    """NCA parameters of one sorted profile (without dose-related columns)."""
    out: dict[str, float] = {k: math.nan for k in NCA_COLUMNS if k not in ("DOSE", "CL_F")}
    if c.size == 0:
        return out
    imax = int(np.argmax(c))
    out["CMAX"] = float(c[imax])
    pos = np.flatnonzero(c > 0)
    if pos.size == 0:
        return out
    out["TMAX"] = float(t[imax])
    ilast = int(pos[-1])
    out["CLAST"] = float(c[ilast])
    out["TLAST"] = float(t[ilast])
    ta, ca = t[: ilast + 1], c[: ilast + 1]
    if ta[0] > 0:
        ta, ca = np.concatenate(([0.0], ta)), np.concatenate(([0.0], ca))
    out["AUCLAST"] = _auc(ta, ca, method)

    after = (np.arange(c.size) > imax) & (c > 0)
    lz, adj, n = _lambda_z(t[after], c[after], min_points)
    if n:
        out["N_LAMBDA_Z"] = n
        out["LAMBDA_Z"] = lz
        out["RSQ_ADJ"] = adj
        out["THALF"] = math.log(2.0) / lz
        out["AUCINF"] = out["AUCLAST"] + out["CLAST"] / lz
        out["AUC_PCT_EXTRAP"] = 100.0 * (out["AUCINF"] - out["AUCLAST"]) / out["AUCINF"]
    return out


def nca(
    df: pd.DataFrame,
    conc: str = "DV",
    *,
    time: str = "TIME",
    id: str = "ID",
    auc_method: str = "linear-up/log-down",
    min_points: int = 3,
) -> pd.DataFrame:
    """Per-subject NCA of a long (NONMEM-style) data set.

    Observations are rows with ``EVID == 0`` (or ``MDV == 0`` if there is MDV but no
    EVID) and non-missing ``conc`` and ``time``. If an ``AMT`` column exists, DOSE is the
    sum of AMT over dosing rows (EVID 1 or 4; without EVID, rows with AMT > 0), and
    CL_F = DOSE / AUCINF; otherwise both are NaN. Times are relative to a single dose at
    time 0.

    Returns one row per subject (sorted by ID; IDs without observations get NaN) with
    columns ID, CMAX [C], TMAX [T], CLAST [C], TLAST [T], AUCLAST [C·T], LAMBDA_Z [1/T],
    THALF [T], RSQ_ADJ, N_LAMBDA_Z (float, NaN if no fit), AUCINF [C·T],
    AUC_PCT_EXTRAP [%], DOSE [D], CL_F [D/(C·T)]. A subject with no positive
    concentration gets CMAX = 0 and NaN elsewhere (except DOSE); lambda_z-dependent
    values are NaN when no valid terminal fit exists.
    """
    if auc_method not in _AUC_METHODS:
        raise ValueError(f"auc_method must be one of {_AUC_METHODS}, got {auc_method!r}")
    if min_points < 3:
        raise ValueError(f"min_points must be >= 3 (adjusted R² needs 3 points), got {min_points}")
    missing = [col for col in (id, time, conc) if col not in df.columns]
    if missing:
        raise KeyError(f"columns not found in data: {missing}")

    if "EVID" in df.columns:
        obs_mask = df["EVID"] == 0
    elif "MDV" in df.columns:
        obs_mask = df["MDV"] == 0
    else:
        obs_mask = pd.Series(True, index=df.index)
    obs = df.loc[obs_mask & df[conc].notna() & df[time].notna(), [id, time, conc]]

    doses: pd.Series | None = None
    if "AMT" in df.columns:
        if "EVID" in df.columns:
            dose_mask = df["EVID"].isin(_DOSE_EVIDS)
        else:
            dose_mask = df["AMT"].fillna(0) > 0
        doses = df.loc[dose_mask].groupby(id, sort=False)["AMT"].sum()

    groups = {key: g for key, g in obs.groupby(id, sort=False)}
    subjects = list(pd.unique(df[id].dropna()))
    try:
        subjects.sort()
    except TypeError:  # mixed ID types: keep order of appearance
        pass
    rows = []
    for subject in subjects:
        g = groups.get(subject)
        if g is None:
            t = c = np.empty(0)
        else:
            g = g.sort_values(time, kind="stable")
            t = g[time].to_numpy(dtype=float)
            c = g[conc].to_numpy(dtype=float)
        par = _profile(t, c, auc_method, min_points)
        dose = math.nan
        if doses is not None and subject in doses.index:
            dose = float(doses[subject])
        par["DOSE"] = dose
        par["CL_F"] = dose / par["AUCINF"] if par["AUCINF"] > 0 else math.nan
        rows.append({id: subject, **par})

    result = pd.DataFrame(rows, columns=[id, *NCA_COLUMNS])
    return result.rename(columns={id: "ID"})


def _units(units: dict[str, str]) -> dict[str, str]:
    """Column -> unit label from base units ``conc``, ``time``, ``dose``; overrides by name."""
    conc, tm, dose = units.get("conc"), units.get("time"), units.get("dose")
    auc = f"{conc}·{tm}" if conc and tm else None
    labels: dict[str, str | None] = {
        "CMAX": conc,
        "CLAST": conc,
        "TMAX": tm,
        "TLAST": tm,
        "THALF": tm,
        "LAMBDA_Z": f"1/{tm}" if tm else None,
        "AUCLAST": auc,
        "AUCINF": auc,
        "AUC_PCT_EXTRAP": "%",
        "DOSE": dose,
        "CL_F": f"{dose}/({auc})" if dose and auc else None,
    }
    labels.update({k: v for k, v in units.items() if k not in ("conc", "time", "dose")})
    return {k: v for k, v in labels.items() if v}


def _fmt(value: object, exact: bool = False) -> str:
    """Format one cell: 4 significant digits, NA for missing; ``exact`` for IDs and counts."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "NA"
    if isinstance(value, bool | np.bool_ | str):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if exact:
            return str(int(value)) if float(value).is_integer() else repr(float(value))
        return f"{float(value):.4g}"
    return str(value)


def format_table(table: pd.DataFrame, units: dict[str, str] | None = None) -> str:
    """Render an :func:`nca` result as an aligned plain-text table.

    Numbers are shown with 4 significant digits (ID and N_LAMBDA_Z in full) and missing
    values as ``NA``. ``units``
    may give base units ``{"conc": "ng/mL", "time": "h", "dose": "mg"}``, from which
    column units are derived (AUC in ``conc·time``, LAMBDA_Z in ``1/time``, CL_F in
    ``dose/(conc·time)``), and/or explicit units by column name (e.g. ``{"CL_F": "L/h"}``).
    """
    labels = _units(units or {})
    headers = [f"{col} ({labels[col]})" if col in labels else str(col) for col in table.columns]
    exact = [col in _EXACT_COLUMNS for col in table.columns]
    cells = [
        [_fmt(v, e) for v, e in zip(row, exact, strict=True)]
        for row in table.itertuples(index=False, name=None)
    ]
    widths = [max([len(h), *(len(r[j]) for r in cells)]) for j, h in enumerate(headers)]
    numeric = [pd.api.types.is_numeric_dtype(table[col]) for col in table.columns]

    def line(items: list[str]) -> str:
        parts = [
            s.rjust(w) if num else s.ljust(w)
            for s, w, num in zip(items, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
