"""Issue 5 benchmark: `pkpd compare` — regimens × parameter draws × patients × 2 years.

    .venv/bin/python benchmarks/bench_compare.py   # --draws 10 --n 50 --years 2 --workers 2

The issue's target case is 4 regimens (40, 60, 100 mg QW and observation) × 500 draws × 500
patients × 2 years (10⁶ patient-trajectories of 104 weeks): ``--draws 500 --n 500`` runs it
(87 s on a 2-core Zen 1 EPYC, 46-53 s on a 2-core Zen 4 EPYC: the JSON records the CPU,
``benchmarks/machine.py``). By default this script times a smaller case on the same code path
(prior draws, blocks of draws, Dask local cluster with ``--workers`` single-threaded worker
processes, or ``--workers 0`` for serial) and scales linearly in patient-weeks to the target
(which overstates it: a small case pays more per patient-week for set-up and the last
block). Sensitivity analysis is off (it is timed separately with
``--sensitivity``).

Printed beside the wall time: the machine's load average before and after (other work on the
machine slows the run) and, for the serial run, the CPU time of this process (all its
threads; numba runs the trial kernel on ``--threads`` threads, default all cores).
``--json PATH`` also writes the figures (e.g. ``benchmarks/results/bench_compare.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from machine import describe

from pkpd._io import atomic_write_text
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
    ap.add_argument("--threads", type=int, default=None, help="numba threads (serial run)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    a = ap.parse_args()
    if a.threads:
        import numba

        numba.set_num_threads(a.threads)

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
    load0 = os.getloadavg()
    t = time.perf_counter()
    cpu = time.process_time()
    c = compare(REGIMENS, n=a.n, draws=a.draws, years=a.years, seed=1,
                block_size=a.block_size, sensitivity=["KKILL"] if a.sensitivity else False,
                scheduler=client)
    dt = time.perf_counter() - t
    cpu = time.process_time() - cpu
    load1 = os.getloadavg()
    if client is not None:
        client.close()
        cluster.close()
    pw = len(c.regimens) * a.draws * a.n * a.years * 52
    target = 4 * 500 * 500 * 2 * 52
    print(f"{len(c.regimens)} regimens × {a.draws} draws × {a.n} patients × {a.years:g} y "
          f"({pw:,.0f} patient-weeks), {a.workers or 'serial'} workers, cores "
          f"{os.cpu_count()}: {dt:.1f} s = {1e6 * dt / pw:.2f} µs per patient-week"
          + ("" if a.workers else f" (CPU time of this process {cpu:.1f} s = "
             f"{1e6 * cpu / pw:.2f} µs per patient-week)"))
    print(f"load average (1 min) before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"scaled to 4 × 500 × 500 × 2 y ({target:,} patient-weeks): "
          f"{dt * target / pw:,.0f} s (target 60 s)")
    if a.json:  # written whole or not at all
        out = {**describe(), "regimens": len(c.regimens), "draws": a.draws, "n": a.n,
               "years": a.years, "workers": a.workers, "threads": a.threads, "seconds": dt,
               "cpu_seconds": None if a.workers else cpu,
               "us_per_patient_week": 1e6 * dt / pw,
               "projected_target_seconds": dt * target / pw,
               "load_before": load0[0], "load_after": load1[0]}
        atomic_write_text(a.json, json.dumps(out, indent=1))
    print(c.decision[["LOW_DOSE", "P_PROGRESSION_NONINFERIOR", "P_AE_LOWER",
                      "P_BENEFIT_VS_OBSERVATION", "DECISION"]].to_string(index=False))


if __name__ == "__main__":
    main()
