"""Simulate the sparse-sampling selinexor popPK trial of fits/selinexor_poppk.toml.

60 patients, selinexor 80 mg twice weekly (days 1 and 3 of each week) for 4 weeks; 4-6
samples each: 2-3 after the first dose (0.5-24 h), one before the day-3 dose (47.9 h) and
1-2 after the day-22 dose. DV has 4 significant digits. Body weight ~ N(75, 15) kg
(45-130), 40 % women. Truth = models/selinexor_pk.toml typical values and IIV; residual
error 20 % proportional. Run from the repository root:

    .venv/bin/python fits/data/make_selinexor_poppk.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pkpd import load_model, simulate

HERE = Path(__file__).resolve().parent
N, SEED, PROP = 60, 20261124, 0.20
DOSES_H = [0.0, 48.0, 168.0, 216.0, 336.0, 384.0, 504.0, 552.0]  # days 1, 3 of weeks 1-4


def main() -> None:
    rng = np.random.default_rng(SEED)
    model = load_model("selinexor_pk")
    rows = []
    for i in range(1, N + 1):
        wt = float(np.clip(rng.normal(75, 15), 45, 130).round(1))
        sex = int(rng.random() < 0.4)
        first = np.sort(rng.choice([0.5, 1.0, 2.0, 4.0, 8.0, 24.0], rng.integers(2, 4),
                                   replace=False))
        late = 504.0 + np.sort(rng.choice([1.0, 2.0, 4.0, 6.0], rng.integers(1, 3),
                                          replace=False))
        times = [*first, 47.9, *late]
        recs = [(t, 1) for t in DOSES_H] + [(float(t), 0) for t in times]
        recs.sort(key=lambda r: (r[0], -r[1]))  # dose before an observation at equal time
        for t, evid in recs:
            rows.append({"ID": i, "TIME": round(t, 3), "EVID": evid, "AMT": 80.0 * evid,
                         "CMT": 1 if evid else 2, "MDV": evid, "DV": np.nan, "WT": wt,
                         "SEX": sex})
    df = pd.DataFrame(rows)
    sim = simulate(model, df, iiv=True, seed=SEED + 1)["CP"].to_numpy()
    obs = df["EVID"].to_numpy() == 0
    dv = sim * (1 + PROP * rng.standard_normal(len(sim)))
    df.loc[obs, "DV"] = [float(f"{v:.4g}") for v in dv[obs]]
    df.to_csv(HERE / "selinexor_poppk.csv", index=False, na_rep=".")
    truth = {"model": "selinexor_pk", "seed": SEED, "n_subjects": N,
             "regimen": "80 mg on days 1 and 3 of weeks 1-4",
             "theta": {k: p.value for k, p in model.parameters.items()},
             "omega_sd": {k: float(np.sqrt(p.omega2)) for k, p in model.parameters.items()
                          if p.omega2 > 0},
             "sigma_prop_CP": PROP}
    (HERE / "selinexor_poppk_truth.json").write_text(json.dumps(truth, indent=2) + "\n")


if __name__ == "__main__":
    main()
