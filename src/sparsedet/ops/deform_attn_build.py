"""Building ``deform_attn_cpu.c`` into a cached shared library (see ``deform_attn_kernel.py``).

The cache key holds the source, the compiler and its version, the flags and this CPU's identity:
its model and feature flags, read from ``/proc/cpuinfo`` on Linux and ``sysctl`` on macOS. A
library tuned for one CPU (``-march=native``) run on another that lacks an instruction dies with
an illegal instruction, so where the flags cannot be read (Windows, anything else) the build is
portable: no native tuning, keyed by the architecture alone.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("deform_attn_cpu.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
OPENMP = "-fopenmp"  # dropped by compilers without OpenMP (Apple clang): the kernel then runs on one thread
# /proc/cpuinfo lines that identify the CPU: x86 has "flags", Arm has "Features" and implementer/part.
CPUINFO_KEYS = ("model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")
SYSCTL_NAMES = ("machdep.cpu.brand_string", "machdep.cpu.features", "machdep.cpu.leaf7_features", "hw.optional")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEDET_HOME", Path.home() / ".cache" / "sparsedet")) / "kernels"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache  # the CPU does not change within a process
def cpu_identity() -> str | None:
    """This CPU's model and feature flags, or None where they cannot be read (build portable)."""
    system = platform.system()
    if system == "Linux":
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            return None
        picked = {ln for ln in lines if ln.startswith(CPUINFO_KEYS)}
        return "\n".join(sorted(picked)) if any(ln.startswith(("flags", "Features")) for ln in picked) else None
    if system == "Darwin":
        found = []
        for name in SYSCTL_NAMES:  # one at a time: x86 and Apple silicon know different names
            try:
                result = subprocess.run(["sysctl", name], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            if result.returncode == 0 and result.stdout.strip():
                found.append(result.stdout.strip())
        return "\n".join(found) if any(f.startswith(("hw.optional", "machdep.cpu.features")) for f in found) else None
    return None


def arch_flags(identity: str | None) -> list[list[str]]:
    """Tuning flags to try in order; the last choice, no flag, builds portable code."""
    if identity is None:
        return [[]]
    if platform.machine().lower() in ("arm64", "aarch64"):
        # Older Apple clang rejects -march=native on arm64 but takes -mcpu=native.
        return [["-march=native"], ["-mcpu=native"], []]
    return [["-march=native"], []]


def library_path(cc: str, version: str) -> Path:
    identity = cpu_identity()
    described = identity if identity is not None else f"portable {platform.machine()}"
    parts = [SOURCE.read_text(), cc, version, " ".join(FLAGS), OPENMP, repr(arch_flags(identity)), described]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / f"ms_deform_attn-{key}.so"


def _compile(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def build(cc: str) -> tuple[Path, bool]:
    """The cached library (built if absent), and whether native tuning was tried for this CPU."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    target = library_path(cc, version)
    choices = arch_flags(cpu_identity())
    tuned = choices != [[]]
    if target.exists():
        return target, tuned
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        errors = ""
        # With OpenMP first, each tuning choice in turn; then the same without OpenMP.
        for openmp in ([OPENMP], []):
            for arch in choices:
                native = ["-DDEFORM_ATTN_NATIVE=1"] if arch else []
                result = _compile([cc, *FLAGS, *arch, *native, *openmp, str(SOURCE), "-o", str(built), "-lm"])
                if result.returncode == 0:
                    os.replace(built, target)
                    return target, tuned
                errors = result.stderr.strip()
    raise RuntimeError(f"{cc} failed: {errors[-500:]}")
