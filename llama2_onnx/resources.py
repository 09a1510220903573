"""What a run needs and what the machine has: memory checked before anything is allocated."""

from __future__ import annotations

import ctypes
import os
import sys

from .errors import UserError

GiB = 1 << 30


def free_host_memory() -> int | None:
    """Bytes of host memory available to a new allocation, or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "win32":
        return _windows_free_memory()
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _windows_free_memory() -> int | None:
    class Status(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                    ("total_phys", ctypes.c_ulonglong), ("avail_phys", ctypes.c_ulonglong),
                    ("total_page", ctypes.c_ulonglong), ("avail_page", ctypes.c_ulonglong),
                    ("total_virtual", ctypes.c_ulonglong), ("avail_virtual", ctypes.c_ulonglong),
                    ("avail_extended", ctypes.c_ulonglong)]

    status = Status()
    status.length = ctypes.sizeof(Status)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.avail_phys)
    except (AttributeError, OSError):
        pass
    return None


def free_cuda_memory(device_id: int = 0) -> int | None:
    """Free memory of a CUDA device via the CUDA runtime onnxruntime-gpu loads, or None."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so", "cudart64_12.dll"):
        try:
            cudart = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if cudart.cudaSetDevice(device_id) == 0 and cudart.cudaMemGetInfo(
                ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
        return None
    return None


def require(what: str, needed: int, available: int | None, where: str, fix: str) -> None:
    """Refuse with the numbers when `needed` bytes do not fit in `available` (None: unknown).

    Raises:
        UserError naming both numbers and `fix`.
    """
    if available is not None and needed > available:
        raise UserError(f"{what} needs {needed / GiB:.1f} GiB of {where} but only "
                        f"{available / GiB:.1f} GiB is free; {fix}.")
