"""The combined trial model is exactly its parts: same outputs as the separate model files."""

from __future__ import annotations

import numpy as np

from pkpd import load_model, simulate_regimen


def test_combined_model_reproduces_its_parts():
    whole = load_model("selinexor_smm")
    assert whole.n_states == 23 and whole.linear is None  # XPO1 = 1 − BOUND is an output
    t = np.arange(0.0, 24 * 14 + 1, 12.0)
    covs = {"MSPIKE0": 2.5, "PLT0": 180.0, "MAYO_FACTORS": 2}
    combined = simulate_regimen(whole, "80 mg BIW", t, covariates=covs)
    for part, outputs in (("smm_progression", ("XPO1_INH", "MSPIKE", "P_PROG")),
                          ("selinexor_platelets", ("PLT",)),
                          ("selinexor_ae", ("CP", "P_NAUSEA_G3"))):
        model = load_model(part)
        alone = simulate_regimen(model, "80 mg BIW", t,
                                 covariates={k: v for k, v in covs.items()
                                             if k in model.covariates})
        for name in outputs:
            # the parts run on the closed form or their own error-controlled steps (rtol 1e-5)
            np.testing.assert_allclose(combined[name], alone[name], rtol=2e-4,
                                       atol=1e-6 * np.abs(alone[name]).max())
