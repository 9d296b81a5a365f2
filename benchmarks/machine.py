"""What a benchmark ran on, for the header of its table: the CPU model and the flags that decide
its speed (vector width, bfloat16, VNNI, AMX), the core count, and the library versions.

Ratios from one machine do not carry over to another (an AVX2 CPU and an AVX-512 one with bf16
order the same workloads differently), so every table says where it came from.
"""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "bf16")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The speed-relevant flags /proc/cpuinfo lists (x86 "flags", Arm "Features")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in RELEVANT_FLAGS if flag in present]
    except OSError:
        pass
    return []


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def describe() -> str:
    """One line, such as "AMD EPYC (avx2 fma avx512f avx512_bf16), 2 cores, x86_64; keras 3.15.1"."""
    libs = ", ".join(f"{k} {v}" for k, v in versions().items() if v)
    flags = " ".join(cpu_flags()) or "no flags read"
    return f"{cpu_model()} ({flags}), {os.cpu_count()} cores, {platform.machine()}; {libs}"
