"""What a run executes on: the compute device, the dtype of its block forwards, and the memory each side has.

Memory readings are what the plan (plan.py) is checked against: the device's free memory before a run, the host's
available RAM (MemAvailable: free plus reclaimable page cache), and the peaks a run reaches, which the pipeline
records per block in run.json (peak RSS of the process; on CUDA, torch's peak allocated bytes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from pathlib import Path

import torch

from .errors import UsageError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "available_memory", "host_available", "rss", "peak_rss",
           "reset_peaks", "device_peak", "trim_host_memory"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROC = Path("/proc/self")


def resolve_device(device: str, planning: bool = False) -> torch.device:
    """The compute device; `planning` accepts a CUDA device this machine lacks (a plan made on a login node)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available() and not planning:
        raise UsageError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype of block forwards and of the calibration activations they pass on. `auto` is the checkpoint's own
    dtype on CUDA (bf16 for most models: tensor cores) and float32 on the CPU (the measured default, README)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and stored in DTYPES.values():
        return stored
    return torch.float32


def host_available() -> int:
    """Bytes of RAM a new allocation can get without swapping: MemAvailable on Linux, free pages elsewhere."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the compute device (the host's available RAM for the CPU); None for a CUDA device this machine
    does not have."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    return host_available()


def _status(field: str) -> int | None:
    status = _PROC / "status"
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss() -> int:
    """The process's resident memory now, in bytes."""
    now = _status("VmRSS")
    return now if now is not None else peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory since the last `reset_peaks` (since it started, where that cannot be
    reset), in bytes."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peaks(device: torch.device) -> None:
    """Start new peak readings: the device's peak allocated bytes and, on Linux, the process's peak RSS (writing 5
    to /proc/self/clear_refs resets VmHWM to the current RSS and changes nothing else)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        (_PROC / "clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then runs from the process start
        pass


def device_peak(device: torch.device) -> int:
    """Peak bytes allocated on the compute device since the last `reset_peaks` (peak RSS on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def _libc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _libc_trim()


def trim_host_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). Memory freed in the
    middle of the heap otherwise stays resident: 0.35 GB after tokenizing PTB's training text, and the freed
    temporaries of every block."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
