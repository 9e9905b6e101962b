"""Machine description shared by the reports (demo, eval, benchmarks)."""

from __future__ import annotations

import os
import platform

import torch


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H100 ...)`` or ``cpu (model name, N threads, M cores visible)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu ({cpu}, {n} thread{'s' if n != 1 else ''}, {os.cpu_count()} cores visible)"
