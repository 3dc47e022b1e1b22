"""Simulate the SMM trial data set of fits/selinexor_smm_joint.toml (and of the IPP pair
fits/selinexor_smm_pk.toml → fits/selinexor_smm_pd.toml).

60 intermediate/high-risk SMM patients of the virtual population (pkpd.population), one
third each on selinexor 40, 60 or 100 mg once weekly for 2 years (104 doses, no dose
modification); sparse selinexor concentrations (DVID 1, ng/mL: 1, 3 and 24 h after the first
dose, 2 h after the week-5 dose, 48 h after the week-9 dose) and M-spike every 4 weeks
(DVID 2, g/dL, first at 24 h). Simulated by ``pkpd.demo.demo_dataset`` with
models/selinexor_smm.toml (typical values and IIV of its model files), 20 % proportional
error on CP and 5 % on the M-spike; DV has 4 significant digits. Truth in
selinexor_smm_joint_truth.json. Run from the repository root:

    .venv/bin/python fits/data/make_selinexor_smm_joint.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pkpd import load_model
from pkpd.demo import PROP_CP, PROP_MSPIKE, demo_dataset

HERE = Path(__file__).resolve().parent
N, SEED, WEEKS = 60, 20261124, 104


def main() -> None:
    df = demo_dataset(N, seed=SEED, weeks=WEEKS)
    tmp = HERE / "selinexor_smm_joint.csv.tmp"
    df.to_csv(tmp, index=False, na_rep=".")
    tmp.replace(HERE / "selinexor_smm_joint.csv")
    model = load_model("smm_mspike")
    truth = {"model": "smm_mspike (data simulated with selinexor_smm: same parameters)",
             "seed": SEED, "n_subjects": N, "weeks": WEEKS,
             "regimen": "40, 60 or 100 mg once weekly (one third each)",
             "theta": {k: p.value for k, p in model.parameters.items()},
             "omega_sd": {k: float(np.sqrt(p.omega2)) for k, p in model.parameters.items()
                          if p.omega2 > 0},
             "sigma_prop_CP_1": PROP_CP, "sigma_prop_MSPIKE_2": PROP_MSPIKE}
    (HERE / "selinexor_smm_joint_truth.json").write_text(json.dumps(truth, indent=2) + "\n")


if __name__ == "__main__":
    main()
