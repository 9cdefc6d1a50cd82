"""What a result depends on besides its config: the machine and the library versions that computed it.

PyTorch picks its CPU kernels by the instruction set it finds (AVX2, AVX-512, ...), and kernels of different vector
widths round differently; over thousands of steps the runs diverge. So a run is bit-for-bit repeatable on the same
kind of CPU with the same PyTorch, and results.json records both.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

# Variables that change what a CPU run computes (kernel choice) or how fast; recorded when set.
_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_")


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"model name\s*:\s*(.+)", text)
    return match.group(1).strip() if match else "unknown"


def host_info() -> dict[str, Any]:
    """The machine and versions of this process, for results.json's `host`."""
    return {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "env": {name: os.environ[name] for name in _ENVIRONMENT if name in os.environ},
    }
