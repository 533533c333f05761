"""What the machine is: CPU, memory, GPU and library versions (recorded with every measured
figure), available memory (the CLI's build-bank check) and this process's peak memory."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
from pathlib import Path

import torch

__all__ = ["cpu_model", "ram_bytes", "machine_info", "peak_rss_mb"]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> tuple[int | None, int | None]:
    """(total, available) physical memory in bytes where the OS says (Linux /proc/meminfo)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        avail = int(info.get("MemAvailable", info["MemFree"]).split()[0]) * 1024
        return total, avail
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (ValueError, OSError, AttributeError):
            return None, None


def machine_info(device: torch.device | None = None) -> dict:
    """What the numbers were measured on: CPU, cores, threads, memory, GPU, library versions, date."""
    import faiss

    total, _ = ram_bytes()
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": None if total is None else round(total / 2**30, 1),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "faiss_gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)()),
        "cuda": bool(torch.cuda.is_available()),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except Exception:
        info["onnxruntime"] = None
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / 1024 if platform.system() != "Darwin" else r / 2**20, 1)  # Linux: kB, macOS: bytes


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
