"""Endpoint computations against closed forms and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from pkpd.endpoints import (
    background_mortality_hazard,
    event_times,
    imwg_progression,
    kaplan_meier,
    wilson_ci,
)


def test_event_times_constant_hazard_is_exponential():
    """H = λt: event times are Exp(λ); check mean and the fraction by 1 year."""
    lam, n = 0.3, 200_000
    t = np.linspace(0, 5, 501)
    H = np.broadcast_to(lam * t, (n, len(t)))
    time, event = event_times(t, H, np.random.default_rng(1))
    # P(T ≤ 1) = 1 − e^{−0.3} = 0.2592; MC SE ≈ 0.001
    assert np.mean(time[event == 1] <= 1.0) * event.mean() == pytest.approx(
        1 - np.exp(-lam), abs=0.004)
    assert event.mean() == pytest.approx(1 - np.exp(-lam * 5), abs=0.004)
    assert np.all(time[event == 0] == 5.0)


def test_event_time_interpolates_in_cumulative_hazard():
    t = np.array([0.0, 1.0, 2.0])
    H = np.array([[0.0, 1.0, 3.0]])
    u = np.array([np.exp(-2.0)])  # target H = 2: halfway between t = 1 and t = 2
    time, event = event_times(t, H, u)
    assert time[0] == pytest.approx(1.5) and event[0] == 1


def test_imwg_progression_needs_25pct_and_half_gram_confirmed():
    t = np.arange(6) * 28.0
    M = np.array([
        [2.0, 1.0, 1.2, 1.6, 1.7, 1.7],   # nadir 1.0: 1.6 is +60 % and +0.6 → confirmed by 1.7
        [2.0, 1.0, 1.2, 1.6, 1.2, 1.7],   # not confirmed at the next assessment, then again
        [4.0, 4.0, 4.4, 4.8, 4.9, 5.0],   # +0.8 g/dL but only +20 % → never
        [0.4, 0.4, 0.6, 0.7, 0.8, 0.9],   # +100 % but +0.5 only at 0.9 (last, unconfirmed)
    ])
    time, event = imwg_progression(t, M)
    assert event.tolist() == [1, 0, 0, 0]
    assert time[0] == 84.0 and time[1] == 140.0


def test_kaplan_meier_matches_hand_computation():
    time = np.array([1, 2, 2, 3, 4, 5])
    event = np.array([1, 1, 0, 1, 0, 1])
    km = kaplan_meier(time, event)
    # S(1) = 5/6, S(2) = 5/6·4/5 = 2/3, S(3) = 2/3·2/3 = 4/9, S(5) = 0
    np.testing.assert_allclose(km["SURVIVAL"], [1, 5 / 6, 2 / 3, 4 / 9, 0.0])
    assert km["AT_RISK"].tolist() == [6, 6, 5, 3, 1]
    assert (km["LOWER"] <= km["SURVIVAL"]).all() and (km["SURVIVAL"] <= km["UPPER"]).all()


def test_wilson_interval_known_value():
    lo, hi = wilson_ci(18, 100)
    # p = 0.18, z = 1.96: centre 0.19184, half-width 0.07484
    assert lo == pytest.approx(0.1170, abs=1e-4) and hi == pytest.approx(0.2667, abs=1e-4)


def test_background_mortality_doubles_every_8_years():
    h = background_mortality_hazard(np.array([65.0, 73.155]), np.array([0, 0]))
    assert h[0] == pytest.approx(0.015) and h[1] / h[0] == pytest.approx(2.0, rel=1e-3)
    assert background_mortality_hazard(65.0, 1) < background_mortality_hazard(65.0, 0)


def test_imwg_needs_three_assessments():
    t, e = imwg_progression(np.array([0.0, 28.0]), np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert list(e) == [0, 0] and list(t) == [28.0, 28.0]
