"""Issue 5 benchmark: `pkpd compare` — regimens × parameter draws × patients × 2 years.

    .venv/bin/python benchmarks/bench_compare.py   # --draws 10 --n 50 --years 2 --workers 2

The issue's target case is 4 regimens (40, 60, 100 mg QW and observation) × 500 draws × 500
patients × 2 years (10⁶ patient-trajectories of 104 weeks). This script times a smaller case
on the same code path (prior draws, blocks of draws, Dask local cluster with ``--workers``
single-threaded worker processes, or ``--workers 0`` for serial) and scales linearly in
patient-weeks to the target. Sensitivity analysis is off (it is timed separately with
``--sensitivity``).
"""

from __future__ import annotations

import argparse
import os
import time

from pkpd.compare import compare

REGIMENS = ["40 mg QW", "60 mg QW", "100 mg QW"]  # + observation ("none"), added by compare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--years", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=2, help="Dask workers; 0 = serial")
    ap.add_argument("--block-size", type=int, default=5)
    ap.add_argument("--sensitivity", action="store_true")
    a = ap.parse_args()

    client = cluster = None
    if a.workers:
        from distributed import Client, LocalCluster

        t = time.perf_counter()
        cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
        # warm the workers (imports, numba caches) so the timing is the simulation
        compare(["40 mg QW"], n=2, draws=a.workers, years=0.1, block_size=1,
                observation=False, sensitivity=False, scheduler=client)
        print(f"cluster start + warm-up: {time.perf_counter() - t:.1f} s")
    else:
        compare(["40 mg QW"], n=2, draws=1, years=0.1, observation=False, sensitivity=False)
    t = time.perf_counter()
    c = compare(REGIMENS, n=a.n, draws=a.draws, years=a.years, seed=1,
                block_size=a.block_size, sensitivity=["KKILL"] if a.sensitivity else False,
                scheduler=client)
    dt = time.perf_counter() - t
    if client is not None:
        client.close()
        cluster.close()
    pw = len(c.regimens) * a.draws * a.n * a.years * 52
    target = 4 * 500 * 500 * 2 * 52
    print(f"{len(c.regimens)} regimens × {a.draws} draws × {a.n} patients × {a.years:g} y "
          f"({pw:,.0f} patient-weeks), {a.workers or 'serial'} workers, cores "
          f"{os.cpu_count()}: {dt:.1f} s = {1e6 * dt / pw:.0f} µs per patient-week")
    print(f"scaled to 4 × 500 × 500 × 2 y ({target:,} patient-weeks): "
          f"{dt * target / pw:,.0f} s (target 60 s)")
    print(c.decision[["LOW_DOSE", "P_PROGRESSION_NONINFERIOR", "P_AE_LOWER",
                      "P_BENEFIT_VS_OBSERVATION", "DECISION"]].to_string(index=False))


if __name__ == "__main__":
    main()
