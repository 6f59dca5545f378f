"""Where a run's numbers came from: the commit of the code and the machine that made them.

metrics.json carries both, so a ledger row (genspec reproduce) can say which code on which
hardware produced it without trusting anyone's memory of it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def commit(folder: str | Path) -> str | None:
    """The git commit checked out in `folder`'s repository, with `+dirty` when tracked files
    differ from it (the run's code is then not exactly that commit). None outside a repository
    or without git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    """The machine a run used: the accelerator when it trained on one, else the CPU and the
    threads torch was given (a 2-core CPU and a 16-core one give different times per epoch)."""
    info = {"platform": platform.platform(terse=True), "cpu": cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    """One line for a table: the GPU where there was one, else the CPU with its threads."""
    if not info:
        return "not recorded"
    if info.get("gpu"):
        return f"{info['gpu']}, torch {info.get('torch', '?')}"
    threads = info.get("torch_threads")
    return f"{info.get('cpu', 'CPU')} ({threads} thread{'s' if threads != 1 else ''}), torch {info.get('torch', '?')}"
