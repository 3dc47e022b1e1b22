"""The machine a benchmark ran on, for its JSON: CPU model and generation, cores. Figures
from different CPUs are not comparable (e.g. the compare benchmark's full case took 87 s on
a Zen 1 EPYC and 46 s on a Zen 4 EPYC, both 2 cores, the same code)."""

from __future__ import annotations

import os
import platform


def describe() -> dict[str, object]:
    """CPU model name, family and model numbers (/proc/cpuinfo, where there is one), cores."""
    info: dict[str, object] = {"cpu": platform.processor() or platform.machine(),
                               "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    info["cpu"] = value
                elif key in ("cpu family", "model") and value.isdigit():
                    info["cpu_family" if key == "cpu family" else "cpu_model"] = int(value)
                elif not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    return info
