"""How many CPUs this process may really use: the container's quota, not the host's cores.

A container limited to 2 CPUs on a 64-core host still sees 64 cores through
os.cpu_count(); a thread pool sized from it runs 64 threads on a 2-CPU quota
and gets throttled. Thread counts are therefore set from the cgroup CPU quota
(v2 cpu.max, v1 cpu.cfs_quota_us) and the CPU affinity, whichever is smaller.
The service sizes onnxruntime with it, the merge job its local Ray instance.
Standard library only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """{controller: path} from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def ancestors(base: Path, relative: str) -> list[Path]:
    """base/relative and every folder above it up to base: a parent's limit applies too."""
    folders = [base]
    current = base
    for part in Path(relative.lstrip("/")).parts:
        current = current / part
        folders.append(current)
    return folders


def read_v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def read_v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU limit of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited.

    Inside a container the process's own cgroup is usually mounted at the root,
    outside it lives at the path /proc/self/cgroup names: both are looked at,
    and the smallest limit found wins.
    """
    paths = cgroup_paths(proc_cgroup)
    candidates: list[float | None] = []
    for folder in ancestors(root, paths.get("", "/")):
        candidates.append(read_v2_quota(folder))
    for v1_mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in ancestors(root / v1_mount, paths.get("cpu", "/")):
            candidates.append(read_v1_quota(folder))
    limits = [value for value in candidates if value is not None]
    return min(limits) if limits else None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(quota: float | None = None, cpus: int | None = None) -> int:
    """Threads for onnxruntime: the CPU quota rounded down (at least 1), at most the CPUs we may use."""
    cpus = available_cpus() if cpus is None else cpus
    if quota is None:
        return max(1, cpus)
    # Rounding down: a thread per fraction of a CPU would be throttled by the quota.
    return max(1, min(cpus, math.floor(quota)))


# Under load the server's event loop keeps about one core busy (0.35 ms of CPU per
# request: 70% of a core at 2000 req/s with the ML-1M model), so the model gets the
# others. On 2 CPUs at 32 clients, 1 onnxruntime thread served 2010 req/s, 2 threads
# 1889 (medians of 3): the second thread only competed with the loop.
EVENT_LOOP_CPUS = 1


def serving_threads(budget: float | None = None, cpus: int | None = None) -> int:
    """onnxruntime threads of the service: its CPU budget less the event loop's core, at least 1."""
    return max(1, default_threads(budget, cpus) - EVENT_LOOP_CPUS)


def usable_cpus() -> int:
    """Whole CPUs this process may use: the quota rounded down, at most the affinity mask."""
    return default_threads(cpu_quota())
