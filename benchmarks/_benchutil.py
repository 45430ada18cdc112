"""Shared helpers of the benchmark scripts: threads, interleaved timing, peak memory, machine load.

Timing: every configuration runs once per round, rounds interleaved (A B C A B C ...), after warm-up
rounds. Reported: the median time of each, and the median over rounds of the per-round ratio to the
baseline (a slow patch of the machine hits both sides of a ratio, so paired ratios are steadier than
ratios of medians on a shared machine).

Peak memory (CPU): measured in a fresh subprocess per configuration. After setup and a warm-up run,
free heap memory is returned to the OS (malloc_trim) and the kernel's high-water mark of the resident
set is reset (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0); the peak is then VmHWM minus the
resident size at the reset, i.e. the extra memory the measured call needed at its worst moment,
allocator and library workspaces included. Where clear_refs is unavailable the fallback is the
ru_maxrss delta, which cannot see below an earlier (import-time) peak; the output says which was used.
On CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call.

Machine load: /proc/stat is sampled around the timed section and the CPU time of this process is
subtracted, giving the average number of cores other processes kept busy meanwhile ("others").
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # only allowed before any inter-op work; fine if refused
    except RuntimeError:
        pass


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------------------
# Load of the machine by other processes


def _proc_stat_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


class LoadMonitor:
    """Average cores used by *other* processes between start() and stop() (Linux; else None)."""

    def __init__(self):
        self.others = None

    def __enter__(self):
        try:
            self._busy0, _ = _proc_stat_busy()
        except (OSError, IndexError):
            self._busy0 = None
        self._own0 = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._busy0 is None:
            return False
        busy1, _ = _proc_stat_busy()
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self._wall0
        own = time.process_time() - self._own0
        self.others = max(0.0, ((busy1 - self._busy0) / hz - own) / max(wall, 1e-9))
        return False


# ------------------------------------------------------------------------------------------------
# Timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, warmup: int = 1, device="cpu") -> dict[str, list[float]]:
    """Seconds per call of each fn, `rounds` interleaved rounds after `warmup` rounds."""
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        out[name] = {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
            "n": len(ts),
        }
    return out


# ------------------------------------------------------------------------------------------------
# Peak memory


def _rss_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1))


class PeakMemory:
    """Extra peak memory of the code inside the `with` block, in bytes (`.peak`), and the method."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak = None
        self.method = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _rss_kib("VmRSS") * 1024
            self.method = "VmHWM after clear_refs"
        except OSError:
            import resource

            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self.method == "VmHWM after clear_refs":
            self.peak = _rss_kib("VmHWM") * 1024 - self._base
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base
        return False


def run_child(script: Path, args: list[str], timeout: float = 900) -> dict:
    """Run `python script args` and return the JSON object on its last stdout line."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def fmt_mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:,.0f}"
