"""The shapes world as a pipeline step: `bard synth` once per (seed, size, benchmark size), reused after.

``world.json`` is the last file synth writes, so a directory holding one that names the same settings and
world version is a complete world of those settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task


def ensure_world(out: str | Path, seed: int, size: int, bench_size: int) -> dict[str, str]:
    """The world's sources and benchmarks directory (written unless an identical one is there)."""
    from bard_core.shapes import world
    from bard_core.shapes.synth import synth

    out = Path(out)
    summary = out / "world.json"
    want = {"world_version": world.WORLD_VERSION, "seed": seed, "size": size, "bench_size": bench_size}
    done = json.loads(summary.read_text()) if summary.exists() else {}
    if any(done.get(k) != v for k, v in want.items()):
        shutil.rmtree(out, ignore_errors=True)
        synth(out, seed=seed, size=size, bench_size=bench_size)
    return {"llava_ov": str(out / "sources" / "llava_ov"), "finevision": str(out / "sources" / "finevision"),
            "benchmarks": str(out / "benchmarks")}


# log_prints off: dill (datasets' fingerprinting) reads `dis.dis` output from a captured stdout, and Prefect's
# print capture would send that bytecode listing to the run's logs instead
@task(name="shapes-world", task_run_name="shapes world seed={seed} size={size}", log_prints=False)
def world_task(out: str, seed: int, size: int, bench_size: int) -> dict[str, str]:
    return ensure_world(out, seed, size, bench_size)
