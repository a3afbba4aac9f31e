"""Benchmarks: each prints its figures with the machine they ran on."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, core count, load average (benchmarks on a shared machine need it) and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores (load average {load:.1f}), Python {platform.python_version()}"
