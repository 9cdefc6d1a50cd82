"""Shared benchmark helpers: machine probes, timing, tables and the results file.

Every comparison the benchmarks report is a ratio of two quantities measured in the same process run, because
the 2-core machine is shared with other engineers' test runs and absolute numbers move with their load.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ecavg.fileio import write_text_atomic
from ecavg.host import host_info

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LATEST = RESULTS_DIR / "latest.json"
SCHEMA_VERSION = 1
DEFAULT_DATA_DIR = Path("/work/shared/datasets")
# Extracted JPEG trees and decompressed IDX files for the plain baseline live here, never under the read-only
# shared dataset folder.
DEFAULT_CACHE_DIR = Path(os.environ.get("ECAVG_BENCH_CACHE", Path.home() / ".cache" / "ecavg-bench"))


# -------------------------------------------------------------------------------------------------
# Machine probes
# -------------------------------------------------------------------------------------------------


def load_average() -> float:
    """1-minute load average: a rough sign of how much other work shared the machine during a measurement."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def sgemm_peak_gflops(sizes: Sequence[int] = (1024, 2048), repeats: int = 5) -> float:
    """Best float32 matrix-multiply rate (GFLOP/s) over a few square sizes: the machine's practical compute peak."""
    best = 0.0
    with torch.no_grad():
        for n in sizes:
            a = torch.randn(n, n)
            b = torch.randn(n, n)
            out = torch.empty(n, n)
            torch.mm(a, b, out=out)  # warm-up: thread pool, MKL dispatch
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b, out=out)
                seconds = time.perf_counter() - start
                best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def copy_bandwidth_gbs(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Memory bandwidth (GB/s, reads + writes) of a large float32 tensor copy, best of ``repeats``.

    Counting both the bytes read and the bytes written is the convention every bandwidth floor here uses.
    """
    numel = nbytes // 4
    src = torch.ones(numel)
    dst = torch.zeros(numel)  # touched, so page faults are not part of the measurement
    dst.copy_(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - start
        best = max(best, 2 * nbytes / seconds / 1e9)
    del src, dst
    return best


# -------------------------------------------------------------------------------------------------
# Process memory (Linux /proc; no psutil in the environment)
# -------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; peak memory cannot be measured here")
    return int(match.group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` calls, in seconds (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -------------------------------------------------------------------------------------------------
# Output
# -------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    file = file or sys.stdout
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}", file=file)
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=file)
    file.flush()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _existing_sections(path: Path) -> dict[str, Any]:
    """The sections of the results file at ``path`` ({} if it is absent, unreadable or of another schema)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return document.get("sections", {}) if document.get("schema") == SCHEMA_VERSION else {}


def earlier_section(path: Path, name: str) -> dict[str, Any] | None:
    """Section ``name`` of the results file at ``path`` as it is now (None if absent or unreadable)."""
    return _existing_sections(path).get(name)


def write_results(sections: dict[str, Any], *, path: Path = LATEST, command: list[str] | None = None) -> Path:
    """Merge ``sections`` into the results file, replacing those sections and keeping the others.

    Each section records when and by which command it was measured, so sections from different runs never pass
    for one run; ratios only ever compare numbers inside one section.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    merged_sections = dict(_existing_sections(path))
    stamp = now_iso()
    machine = host_info()
    for name, body in sections.items():
        # Sections merged from different runs may come from different machines: each keeps its own.
        merged_sections[name] = {"measured_at": stamp, "command": command or sys.argv, "machine": machine, **body}
    document = {
        "schema": SCHEMA_VERSION,
        "updated_at": stamp,
        "machine": machine,
        "sections": merged_sections,
    }
    write_text_atomic(path, json.dumps(document, indent=2, default=str) + "\n")
    return path
