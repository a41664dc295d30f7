"""Peak memory of a piece of work, measured in a fresh process by the kernel's own counters."""

from __future__ import annotations

import json
import subprocess
import sys


def vm_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes() -> int:
    """This process's resident high-water mark (VmHWM) in bytes."""
    return vm_kib("VmHWM") * 1024


def run_measured(setup: str, work: str) -> dict:
    """Run ``setup`` (imports) then ``work`` in a fresh Python process.

    ``work`` must leave its result (JSON-serialisable) in a variable ``result``. Returns that plus
    ``baseline_rss`` (bytes resident after ``setup``) and ``peak_rss`` (the high-water mark VmHWM:
    every page touched, memory-mapped file pages included). ``ru_maxrss`` would not do: on Linux a
    child's value starts from its parent's size at fork.
    """
    code = "\n".join([
        "import json",
        "from emscale.bench.memory import vm_kib",
        setup,
        "base = vm_kib('VmRSS') * 1024",
        "result = None",
        work,
        "print(json.dumps({'result': result, 'baseline_rss': base, 'peak_rss': vm_kib('VmHWM') * 1024}))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measured child failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
