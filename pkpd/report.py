"""Figures, tables and the self-contained HTML report of a dose comparison
(:func:`pkpd.compare.compare`). ``write_report(comparison, folder)`` writes into an existing
folder; the CLI writes into a temporary folder and renames it, so no partial report is left.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import AE_ENDPOINTS, ENDPOINTS, Comparison

__all__ = ["FIGURES", "write_report"]

FIGURES = {
    "exposure_xpo1.png": "Selinexor concentration and XPO1 inhibition, first two weeks",
    "mspike_bands.png": "M-spike over time by regimen",
    "km_progression.png": "Progression to myeloma (Kaplan–Meier) by regimen",
    "km_pfs.png": "Progression-free survival (Kaplan–Meier) by regimen",
    "forest.png": "Differences versus the standard dose",
    "ae_rates.png": "Grade ≥ 3 adverse events in the first year",
    "tornado.png": "Sensitivity of the decision metrics to assumptions",
}
LABELS = {
    "PROGRESSION_2Y": "Progression to MM at 2 y",
    "PFS_1Y": "PFS at 1 y",
    "MSPIKE_CHANGE_1Y": "M-spike change at 1 y (median)",
    "SFLC_CHANGE_1Y": "sFLC change at 1 y (median)",
    "SRE_1Y": "Skeletal-related event by 1 y",
    "THROMBOCYTOPENIA_G3_1Y": "Thrombocytopenia grade ≥ 3",
    "NAUSEA_G3_1Y": "Nausea grade ≥ 3",
    "FATIGUE_G3_1Y": "Fatigue grade ≥ 3",
    "APPETITE_G3_1Y": "Anorexia grade ≥ 3",
    "HYPONATREMIA_G3_1Y": "Hyponatremia grade ≥ 3",
    "ANY_AE_G3_1Y": "Any grade ≥ 3 AE",
    "DOSE_INTENSITY": "Dose intensity (mean)",
    "DOSE_REDUCED": "Dose reduced",
    "REDUCTION_DAYS": "Time to first dose reduction (median of reduced patients, days)",
    "XPO1_INH_MEAN": "Mean XPO1 inhibition (median)",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(regimens: list[str]) -> dict[str, str]:
    return {r: f"C{i}" for i, r in enumerate(regimens)}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_exposure(c: Comparison, path: Path, max_draws: int = 20, n: int = 100) -> None:
    """Concentration (ng/mL) and XPO1 inhibition over the first two weeks: the typical
    patient of up to ``max_draws`` parameter draws (median and 95 % band across draws) and
    the between-patient 5–95th percentiles at the model files' values."""
    from .model import load_model
    from .simulation import simulate_regimen

    plt = _plt()
    m = load_model("selinexor_xpo1")
    t = np.arange(0.0, 14 * 24 + 1, 2.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    col = _colors(c.regimens)
    th = c.theta[[k for k in c.theta.columns if k in m.parameters]].iloc[:max_draws]
    for reg in c.regimens:
        if reg.strip().lower() == "none":
            continue
        typ = {"CP": [], "XPO1_INH": []}
        for _, row in th.iterrows():
            r = simulate_regimen(m, reg, t, n=1, params=row.to_dict())
            for k in typ:
                typ[k].append(np.asarray(r[k])[0])
        if not len(th):
            r = simulate_regimen(m, reg, t, n=1)
            for k in typ:
                typ[k].append(np.asarray(r[k])[0])
        pop = simulate_regimen(m, reg, t, n=n, seed=1)
        for ax, k in zip(axes, ("CP", "XPO1_INH"), strict=True):
            y = np.array(typ[k]) * (100 if k == "XPO1_INH" else 1)
            yp = np.asarray(pop[k]) * (100 if k == "XPO1_INH" else 1)
            ax.plot(t / 24, np.median(y, axis=0), color=col[reg], lw=1.5, label=reg)
            if len(y) > 1:
                lo, hi = np.percentile(y, [2.5, 97.5], axis=0)
                ax.fill_between(t / 24, lo, hi, color=col[reg], alpha=0.2)
            lo, hi = np.percentile(yp, [5, 95], axis=0)
            ax.plot(t / 24, lo, color=col[reg], lw=0.7, ls=":")
            ax.plot(t / 24, hi, color=col[reg], lw=0.7, ls=":")
    axes[0].set_ylabel("Selinexor plasma concentration (ng/mL)")
    axes[1].set_ylabel("XPO1 inhibition (%)")
    for ax in axes:
        ax.set_xlabel("Time (days)")
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=8)
    axes[0].set_title("Typical patient: median and 95 % band over draws;\n"
                      "dotted: 5th/95th percentile of patients", fontsize=9)
    _save(fig, path)


def plot_mspike(c: Comparison, path: Path) -> None:
    """Per regimen: patient percentiles (5–95, 25–75, median; median over draws) and the
    95 % interval over draws of the median patient (dashed)."""
    plt = _plt()
    regs = c.regimens
    fig, axes = plt.subplots(1, len(regs), figsize=(3.6 * len(regs), 3.8), sharey=True,
                             squeeze=False)
    for ax, reg in zip(axes[0], regs, strict=True):
        q = c.curves[reg]["MSPIKE"]  # (draws, 5, weeks)
        w = c.curves[reg]["WEEKS"]
        med = np.median(q, axis=0)
        ax.fill_between(w, med[0], med[4], alpha=0.2, color="C0", label="5th–95th pct")
        ax.fill_between(w, med[1], med[3], alpha=0.35, color="C0", label="25th–75th pct")
        ax.plot(w, med[2], color="C0", lw=1.5, label="median patient")
        lo, hi = np.percentile(q[:, 2], [2.5, 97.5], axis=0)
        ax.plot(w, lo, "k--", lw=0.8, label="95 % interval over draws")
        ax.plot(w, hi, "k--", lw=0.8)
        ax.set_title(reg)
        ax.set_xlabel("Time (weeks)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("M-spike (g/dL)")
    axes[0, 0].legend(frameon=False, fontsize=7)
    _save(fig, path)


def plot_km(c: Comparison, key: str, path: Path) -> None:
    """Median KM curve over draws per regimen with its 95 % band (parameter uncertainty)."""
    plt = _plt()
    months = c.curves["_GRID_MONTHS"]["MONTHS"]
    keep = months <= c.settings["years"] * 12 + 1e-9
    fig, ax = plt.subplots(figsize=(7, 4.5))
    col = _colors(c.regimens)
    for reg in c.regimens:
        y = c.curves[reg][key][:, keep]
        ax.step(months[keep], np.median(y, axis=0), where="post", color=col[reg], label=reg)
        lo, hi = np.percentile(y, [2.5, 97.5], axis=0)
        ax.fill_between(months[keep], lo, hi, step="post", color=col[reg], alpha=0.15)
    ax.set_xlabel("Time (months)")
    ax.set_ylabel("Cumulative progression to myeloma" if key == "PROG"
                  else "Progression-free survival")
    ax.set_ylim(0, 1)
    ax.set_title("Median over parameter draws; band: 95 % interval", fontsize=9)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    _save(fig, path)


FOREST = ("PROGRESSION_2Y", "PFS_1Y", "SRE_1Y", "THROMBOCYTOPENIA_G3_1Y", "NAUSEA_G3_1Y",
          "FATIGUE_G3_1Y", "HYPONATREMIA_G3_1Y", "ANY_AE_G3_1Y", "DOSE_REDUCED")


def plot_forest(c: Comparison, path: Path) -> None:
    """Paired differences (regimen − standard) in percentage points: median and 95 %
    interval over draws; the margins as dotted lines."""
    plt = _plt()
    d = c.differences
    regs = [r for r in c.regimens if r != c.standard]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(FOREST) * max(len(regs), 1) + 1.5))
    col = _colors(c.regimens)
    y0 = 0.0
    ticks, labels = [], []
    for k in FOREST:
        for i, reg in enumerate(regs):
            r = d[(d["REGIMEN"] == reg) & (d["ENDPOINT"] == k)].iloc[0]
            y = y0 - i * 0.25
            ax.errorbar(100 * r["MEDIAN"], y, xerr=[[100 * (r["MEDIAN"] - r["LOWER"])],
                                                    [100 * (r["UPPER"] - r["MEDIAN"])]],
                        fmt="o", color=col[reg], ms=4, capsize=2,
                        label=reg if k == FOREST[0] else None)
        ticks.append(y0 - 0.125 * (len(regs) - 1))
        labels.append(LABELS[k])
        y0 -= 0.25 * len(regs) + 0.4
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(100 * c.settings["margin_progression"], color="C3", ls=":", lw=0.8,
               label="progression margin")
    ax.axvline(-100 * c.settings["margin_ae"], color="C2", ls=":", lw=0.8, label="AE margin")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel(f"Difference vs {c.standard} (percentage points)")
    ax.legend(frameon=False, fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def plot_ae(c: Comparison, path: Path) -> None:
    """Grouped bars of grade ≥ 3 AE rates in year 1 (%), median over draws, 95 % interval."""
    plt = _plt()
    e = c.endpoints.set_index(["REGIMEN", "ENDPOINT"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(c.regimens)
    x = np.arange(len(AE_ENDPOINTS))
    col = _colors(c.regimens)
    for i, reg in enumerate(c.regimens):
        r = e.loc[reg].loc[list(AE_ENDPOINTS)]
        ax.bar(x + i * width, 100 * r["MEDIAN"], width, color=col[reg], label=reg,
               yerr=[100 * (r["MEDIAN"] - r["LOWER"]), 100 * (r["UPPER"] - r["MEDIAN"])],
               capsize=2)
    ax.set_xticks(x + width * (len(c.regimens) - 1) / 2,
                  [LABELS[k].replace(" grade ≥ 3", "") for k in AE_ENDPOINTS], fontsize=8)
    ax.set_ylabel("Patients with grade ≥ 3 event in year 1 (%)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_tornado(c: Comparison, path: Path) -> None:
    """Per low dose and decision metric: the probability with each assumption at its lower and
    upper bound (bars from the reference value, the run with every assumption drawn);
    assumptions sorted by their largest swing; * marks those that flip the decision."""
    plt = _plt()
    s = c.sensitivity
    lows = list(c.decision["LOW_DOSE"]) if len(c.decision) else []
    if s is None or s.empty or not lows:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "Sensitivity analysis not run", ha="center", va="center")
        ax.axis("off")
        _save(fig, path)
        return
    metrics = {"P_PROGRESSION_NONINFERIOR": "P(2-y progression within margin)",
               "P_AE_LOWER": "P(grade ≥ 3 AE lower by margin)",
               "P_BENEFIT_VS_OBSERVATION": "P(benefit vs observation)"}
    params = [p for p in dict.fromkeys(s["PARAMETER"]) if p != "(reference)"]
    fig, axes = plt.subplots(len(lows), 3, figsize=(14, 0.3 * len(params) * len(lows) + 2.2),
                             squeeze=False)
    for i, low in enumerate(lows):
        d = s[s["LOW_DOSE"] == low]
        ref = d[d["PARAMETER"] == "(reference)"].iloc[0]
        flips = set(d[d["FLIPS"]]["PARAMETER"])
        for ax, (mname, label) in zip(axes[i], metrics.items(), strict=True):
            base = ref[mname]
            lo = np.array([d[(d.PARAMETER == p) & (d.BOUND == "lower")][mname].iloc[0]
                           for p in params], dtype=float)
            hi = np.array([d[(d.PARAMETER == p) & (d.BOUND == "upper")][mname].iloc[0]
                           for p in params], dtype=float)
            swing = np.nan_to_num(np.maximum(np.abs(lo - base), np.abs(hi - base)))
            order = np.argsort(swing, kind="stable")
            y = np.arange(len(params))
            ax.barh(y + 0.2, lo[order] - base, left=base, height=0.4, color="C0",
                    label="at lower bound")
            ax.barh(y - 0.2, hi[order] - base, left=base, height=0.4, color="C1",
                    label="at upper bound")
            ax.set_yticks(y, [params[j] + (" *" if params[j] in flips else "") for j in order],
                          fontsize=7)
            ax.axvline(base, color="k", lw=0.8)
            ax.axvline(c.settings["threshold"], color="C3", ls=":", lw=0.8)
            ax.set_xlim(-0.02, 1.02)
            ax.set_xlabel(f"{label} (probability)", fontsize=8)
            ax.set_title(f"{low} vs {c.standard}", fontsize=9)
        axes[i, 0].legend(frameon=False, fontsize=7, loc="lower left")
    fig.text(0.5, 0.005, "Black line: reference (all assumptions drawn); dotted: decision "
             "threshold; * the decision flips at a bound", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(c: Comparison, folder: Path) -> None:
    """All PNG figures of :data:`FIGURES` into ``folder``."""
    folder = Path(folder)
    plot_exposure(c, folder / "exposure_xpo1.png")
    plot_mspike(c, folder / "mspike_bands.png")
    plot_km(c, "PROG", folder / "km_progression.png")
    plot_km(c, "PFS", folder / "km_pfs.png")
    plot_forest(c, folder / "forest.png")
    plot_ae(c, folder / "ae_rates.png")
    plot_tornado(c, folder / "tornado.png")


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f} %"


def _fmt(x: float, unit: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if unit == "days":
        return f"{x:.0f}"
    return f"{100 * x:.1f} %"


def _decision_html(c: Comparison) -> str:
    s = c.settings
    rows = []
    for _, r in c.decision.iterrows():
        cls = "ok" if r["DECISION"] == "supported" else "no"
        rows.append(
            f"<tr><td>{html.escape(r['LOW_DOSE'])}</td>"
            f"<td>{_pct(r['P_PROGRESSION_NONINFERIOR'])}</td><td>{_pct(r['P_AE_LOWER'])}</td>"
            f"<td>{_pct(r['P_BENEFIT_VS_OBSERVATION'])}</td>"
            f"<td>{100 * r['DELTA_PROGRESSION_2Y']:+.1f} "
            f"({100 * r['DELTA_PROGRESSION_2Y_LOWER']:+.1f}, "
            f"{100 * r['DELTA_PROGRESSION_2Y_UPPER']:+.1f})</td>"
            f"<td>{100 * r['DELTA_ANY_AE_G3_1Y']:+.1f} "
            f"({100 * r['DELTA_ANY_AE_G3_1Y_LOWER']:+.1f}, "
            f"{100 * r['DELTA_ANY_AE_G3_1Y_UPPER']:+.1f})</td>"
            f"<td class='{cls}'>{html.escape(r['DECISION'])}</td></tr>")
    return (
        "<table class='decision'><tr><th>Low dose</th>"
        f"<th>P(2-y progression within {100 * s['margin_progression']:g} points of "
        f"{html.escape(c.standard)})</th>"
        f"<th>P(any grade ≥ 3 AE lower by ≥ {100 * s['margin_ae']:g} points)</th>"
        "<th>P(benefit vs observation)</th>"
        "<th>Δ 2-y progression, points (95 % interval)</th>"
        "<th>Δ any grade ≥ 3 AE, points (95 % interval)</th>"
        f"<th>Decision (all ≥ {100 * s['threshold']:g} %)</th></tr>"
        + "".join(rows) + "</table>")


def _endpoints_html(c: Comparison) -> str:
    e = c.endpoints
    head = "".join(f"<th>{html.escape(r)}</th>" for r in c.regimens)
    rows = []
    for k, (unit, _) in ENDPOINTS.items():
        cells = []
        for reg in c.regimens:
            r = e[(e["REGIMEN"] == reg) & (e["ENDPOINT"] == k)].iloc[0]
            txt = f"{_fmt(r['MEDIAN'], unit)} <small>({_fmt(r['LOWER'], unit)}, " \
                  f"{_fmt(r['UPPER'], unit)})</small>"
            if not math.isnan(r["PATIENT_LOWER"]):
                txt += f"<br><small class='pv'>patients {_fmt(r['PATIENT_LOWER'], unit)} to " \
                       f"{_fmt(r['PATIENT_UPPER'], unit)}</small>"
            cells.append(f"<td>{txt}</td>")
        rows.append(f"<tr><th class='ep'>{html.escape(LABELS[k])}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>Endpoint</th>{head}</tr>{''.join(rows)}</table>"


def _sensitivity_html(c: Comparison) -> str:
    s = c.sensitivity
    if s is None or s.empty:
        return "<p>Sensitivity analysis not run.</p>"
    ref = s[s["PARAMETER"] == "(reference)"]
    ref_note = "<p>Reference decisions of the sensitivity run: " + ", ".join(
        html.escape(f"{r.LOW_DOSE}: {r.DECISION} (P = {r.P_PROGRESSION_NONINFERIOR:.2f}, "
                    f"{r.P_AE_LOWER:.2f}, {r.P_BENEFIT_VS_OBSERVATION:.2f})")
        for r in ref.itertuples()) + ".</p>"
    flips = s[s["FLIPS"]]
    note = ("<p class='no'>Decision flips: " + ", ".join(
        html.escape(f"{r.LOW_DOSE}: {r.PARAMETER} at its {r.BOUND} bound ({r.VALUE:g} "
                    f"{r.UNIT})") for r in flips.itertuples()) + "</p>") if len(flips) else \
        "<p>No assumption flips the decision at either bound.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(r.PARAMETER)}</td><td>{r.BOUND}</td>"
        f"<td>{'' if math.isnan(r.VALUE) else f'{r.VALUE:g} {html.escape(r.UNIT)}'}</td>"
        f"<td>{html.escape(r.LOW_DOSE)}</td><td>{_pct(r.P_PROGRESSION_NONINFERIOR)}</td>"
        f"<td>{_pct(r.P_AE_LOWER)}</td><td>{_pct(r.P_BENEFIT_VS_OBSERVATION)}</td>"
        f"<td class='{'no' if r.FLIPS else ''}'>{r.DECISION}</td></tr>"
        for r in s.itertuples())
    return (ref_note + note + "<details><summary>Table</summary><table><tr><th>Assumption</th>"
            "<th>Bound</th><th>Value</th><th>Low dose</th><th>P(prog. within margin)</th>"
            "<th>P(AE lower)</th><th>P(benefit)</th><th>Decision</th></tr>" + rows +
            "</table></details>")


CSS = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.5em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{background:#d8f0d8;font-weight:bold}.no{background:#f6dcdc}
table.decision{font-size:15px}.pv{color:#666}img{max-width:100%;border:1px solid #eee}
small{color:#555}h1{font-size:1.5em}"""


def render_html(c: Comparison, folder: Path) -> str:
    """The report as one HTML string with the PNGs of ``folder`` embedded (base64)."""
    s = c.settings
    figs = []
    for name, title in FIGURES.items():
        data = base64.b64encode((Path(folder) / name).read_bytes()).decode("ascii")
        figs.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' "
                    f"src='data:image/png;base64,{data}'>")
    ranges = "".join(
        f"<li>{html.escape(k)}: {lo:g} – {hi:g} ({kind})</li>"
        for k, (lo, hi, kind) in s["ranges"].items() if k in s["drawn"])
    fixed_note = ("" if s["source"] == "prior" else
                  f"<p>Source: {html.escape(s['source'])}.</p>")
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<title>Selinexor dose comparison</title><style>{CSS}</style></head><body>
<h1>Selinexor in smoldering myeloma: low vs standard dose</h1>
<p>{s['n']} virtual patients (risk: {html.escape(s['risk'])}) per parameter draw ×
{s['draws']} draws ({html.escape(s['source'])}), {s['years']:g} years of follow-up, label dose
modification, seed {s['seed']}. Standard dose: <b>{html.escape(c.standard)}</b>.</p>
{_decision_html(c)}
<p><small>Probabilities are over parameter draws, using paired (same draw, same patients)
differences. “Supported” needs all three probabilities ≥ {100 * s['threshold']:g} %.
Progression at min(2, follow-up) years. Each draw's rates come from its {s['n']} patients, so
the probabilities include the chance variation of a trial of that size.</small></p>
<h2>Endpoints</h2>
<p><small>Median over parameter draws (95 % interval: parameter uncertainty); for
patient-level quantities, “patients” is the 2.5th–97.5th percentile range between patients
(median over draws).</small></p>
{_endpoints_html(c)}
<h2>Sensitivity to assumptions</h2>
<p><small>Each assumption fixed at its lower and upper bound, the others at their first
{s['sensitivity_draws']} draws, {s['sensitivity_n']} patients per draw (same patients for
every setting); a flip is a decision different from the reference row of that run. With few
patients per draw the reference can differ from the main decision above.</small></p>
{_sensitivity_html(c)}
<h2>Figures</h2>
{''.join(figs)}
<h2>Methods</h2>
<p>Model {html.escape(s['model'])}. Parameter draws: each assumption parameter with a stated
range is drawn independently, log-uniform on [lower, upper] when lower &gt; 0, uniform when
lower = 0; all others at their values. Drawn: </p><ul>{ranges}</ul>{fixed_note}
<p>Run time {s['seconds']:.0f} s.</p>
</body></html>"""


def write_report(c: Comparison, folder: str | Path) -> None:
    """Write endpoints.csv, differences.csv, decision.csv, sensitivity.csv, draws.csv,
    the PNG figures and report.html into ``folder`` (which must exist)."""
    folder = Path(folder)
    c.endpoints.to_csv(folder / "endpoints.csv", index=False)
    c.differences.to_csv(folder / "differences.csv", index=False)
    c.decision.to_csv(folder / "decision.csv", index=False)
    sens = c.sensitivity if c.sensitivity is not None else pd.DataFrame(
        columns=["PARAMETER", "BOUND", "VALUE", "UNIT", "LOW_DOSE"])
    sens.to_csv(folder / "sensitivity.csv", index=False)
    c.draws.to_csv(folder / "draws.csv", index=False)
    c.theta.to_csv(folder / "theta.csv", index=False)
    write_figures(c, folder)
    (folder / "report.html").write_text(render_html(c, folder), encoding="utf-8")
