"""Virtual smoldering-myeloma (SMM) patients: baseline covariates and risk groups.

Risk factors follow the Mayo 2018 "20/2/20" model as validated by IMWG 2020 (Mateos et al.,
Blood Cancer J 2020;10:102, n = 1,996; domain.md §4.4): serum M-protein > 2 g/dL, involved/
uninvolved free-light-chain ratio > 20, bone-marrow plasma cells > 20 %. 0 factors = low,
1 = intermediate, ≥ 2 = high risk, with cohort shares 38 / 33 / 29 %.

How the covariates are drawn (assumptions, each stated):

* M-spike, FLC ratio and BMPC share a Gaussian copula with equal pairwise correlation ρ and
  log-normal marginals. With each factor equally prevalent, the two published shares fix
  both unknowns: prevalence p = 0.331 per factor and ρ = 0.314 reproduce 38 / 33 / 29 %
  exactly (solved in ``tests/test_population.py``). The spreads (log-SD) are assumptions.
* BMPC is kept within the SMM definition, 10–59 % (IMWG 2014; ≥ 60 % is myeloma).
* Age ~ N(63, 10) years clipped to 35–90, 45 % women, weight log-normal (median 82 kg men,
  70 kg women, log-SD 0.18), high-risk FISH in 30 %: plausible SMM-cohort values,
  not taken from a cited table.
* Involved sFLC (mg/dL) = FLC ratio × uninvolved sFLC (log-normal, median 1.0 mg/dL).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = ["RISK_GROUPS", "PopulationError", "imwg_score", "mayo_factors",
           "parse_risk_groups", "risk_group", "smm_population"]

RISK_GROUPS = ("low", "intermediate", "high")
SHARES_IMWG_2020 = {"low": 0.38, "intermediate": 0.33, "high": 0.29}
PROGRESSION_2Y_IMWG_2020 = {"low": 0.06, "intermediate": 0.18, "high": 0.44}

# copula fitted to the IMWG 2020 shares (see module docstring)
_PREVALENCE = 0.331
_RHO = 0.314
_LOGSD = {"MSPIKE0": 0.45, "FLCR": 1.1, "BMPC0": 0.40}
_CUT = {"MSPIKE0": 2.0, "FLCR": 20.0, "BMPC0": 20.0}


class PopulationError(ValueError):
    """Bad request for a virtual population (unknown risk group, n < 1)."""


def mayo_factors(mspike: np.ndarray, flcr: np.ndarray, bmpc: np.ndarray) -> np.ndarray:
    """Number of 20/2/20 risk factors: M-spike > 2 g/dL, FLC ratio > 20, BMPC > 20 %."""
    return ((np.asarray(mspike) > 2.0).astype(int) + (np.asarray(flcr) > 20.0)
            + (np.asarray(bmpc) > 20.0))


def risk_group(factors: np.ndarray) -> np.ndarray:
    """'low' (0 factors), 'intermediate' (1), 'high' (2-3)."""
    return np.array(RISK_GROUPS)[np.minimum(np.asarray(factors), 2)]


def imwg_score(flcr: np.ndarray, mspike: np.ndarray, bmpc: np.ndarray,
               fish: np.ndarray) -> np.ndarray:
    """IMWG continuous risk score (domain.md §4.4): FLCr 0-10/11-25/26-40/>40 → 0/2/3/5;
    M-protein 0-1.5/1.6-2.9/≥3 g/dL → 0/3/4; BMPC 0-15/16-20/21-30/31-40/>40 % →
    0/2/3/5/6; any high-risk FISH abnormality → 2."""
    flcr, mspike, bmpc = (np.asarray(v, dtype=float) for v in (flcr, mspike, bmpc))
    s = np.select([flcr > 40, flcr > 25, flcr > 10], [5, 3, 2], 0)
    s += np.select([mspike >= 3.0, mspike > 1.5], [4, 3], 0)
    s += np.select([bmpc > 40, bmpc > 30, bmpc > 20, bmpc > 15], [6, 5, 3, 2], 0)
    return s + 2 * (np.asarray(fish) > 0)


def smm_population(n: int, *, risk: Sequence[str] | str | None = None,
                   seed: int | None = None) -> pd.DataFrame:
    """``n`` virtual SMM patients (optionally only the given risk groups), one row each.

    Columns: ID, AGE (years), SEX (0 male, 1 female), WT (kg), MSPIKE0 (g/dL), FLCR (-),
    SFLC0 (involved sFLC, mg/dL), BMPC0 (%), HRFISH (0/1), MAYO_FACTORS, RISK, IMWG_SCORE.
    Same seed ⇒ same patients.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise PopulationError(f"n must be a positive integer, got {n!r}")
    groups = parse_risk_groups(risk)
    rng = np.random.default_rng(seed)
    parts, have = [], 0
    while have < n:
        batch = _draw(max(2 * (n - have), 256), rng)
        batch = batch[batch["RISK"].isin(groups)]
        parts.append(batch)
        have += len(batch)
    pop = pd.concat(parts, ignore_index=True).iloc[:n].copy()
    pop.insert(0, "ID", np.arange(1, n + 1))
    return pop.reset_index(drop=True)


def parse_risk_groups(risk: Sequence[str] | str | None) -> list[str]:
    """Risk groups from "intermediate,high" or a list (None: all); unknown names are errors."""
    if risk is None:
        return list(RISK_GROUPS)
    items = [r.strip().lower() for r in (risk.split(",") if isinstance(risk, str) else risk)]
    bad = [r for r in items if r not in RISK_GROUPS]
    if bad or not items:
        raise PopulationError(f"unknown risk group {bad[0] if bad else ''!r} (expected "
                              f"{', '.join(RISK_GROUPS)})")
    return items


def _draw(k: int, rng: np.random.Generator) -> pd.DataFrame:
    f = rng.standard_normal(k)
    z = np.sqrt(_RHO) * f[:, None] + np.sqrt(1 - _RHO) * rng.standard_normal((k, 3))
    cut = norm.ppf(1 - _PREVALENCE)  # latent threshold: P(z > cut) = prevalence
    vals = {}
    for j, name in enumerate(("MSPIKE0", "FLCR", "BMPC0")):
        # log-normal with P(value > clinical cut-off) = prevalence
        vals[name] = _CUT[name] * np.exp(_LOGSD[name] * (z[:, j] - cut))
    vals["BMPC0"] = np.clip(vals["BMPC0"], 10.0, 59.0)
    vals["FLCR"] = np.maximum(vals["FLCR"], 1.0)
    sex = (rng.random(k) < 0.45).astype(int)
    wt = np.where(sex == 1, 70.0, 82.0) * np.exp(0.18 * rng.standard_normal(k))
    age = np.clip(rng.normal(63.0, 10.0, k), 35.0, 90.0)
    fish = (rng.random(k) < 0.30).astype(int)
    uninvolved = np.exp(0.3 * rng.standard_normal(k))  # mg/dL, median 1.0
    factors = mayo_factors(vals["MSPIKE0"], vals["FLCR"], vals["BMPC0"])
    return pd.DataFrame({
        "AGE": age, "SEX": sex, "WT": wt, "MSPIKE0": vals["MSPIKE0"], "FLCR": vals["FLCR"],
        "SFLC0": vals["FLCR"] * uninvolved, "BMPC0": vals["BMPC0"], "HRFISH": fish,
        "MAYO_FACTORS": factors, "RISK": risk_group(factors),
        "IMWG_SCORE": imwg_score(vals["FLCR"], vals["MSPIKE0"], vals["BMPC0"], fish),
    })
