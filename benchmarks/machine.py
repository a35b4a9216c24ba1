"""What every benchmark's result file says about the machine it ran on: the command, the threads, the CPU and the
flags that decide its fast paths (AVX2, AVX-512, AMX), the GPU where one was used, and the versions.

    from machine import describe, machine_line
    report = {"command": "python benchmarks/bench_x.py", **describe(threads=1)}
    lines = ["# ...", "", machine_line(report)]
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector and matrix flags: avx2, the avx512 family (avx512_bf16 among them), amx_*."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))


def describe(threads: int | None = None) -> dict:
    """The machine in a result file's words. `threads`: what the benchmark set (default: torch's count now)."""
    import torch

    info = {"threads": threads if threads is not None else torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_flags": cpu_flags(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(report: dict) -> str:
    """One Markdown line: the command, the threads, the CPU and its flags, the GPU, torch."""
    flags = ", ".join(report.get("cpu_flags") or []) or "none of avx2 / avx512 / amx"
    gpu = f"; GPU {report['gpu']}" if report.get("gpu") else ""
    return (f"Command: `{report['command']}`; {report['threads']} thread(s) on {report['cpu']} (flags: {flags}){gpu}; "
            f"torch {report['torch']}, Python {report['python']}")
