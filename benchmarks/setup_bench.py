"""Fresh-machine set-up cost: `make setup` in a new clone with a new venv, an empty pip cache and a new project
home (so the model is downloaded and converted too), then the same command again (the idempotent path).

    .venv/bin/python -m benchmarks.setup_bench      # ~5 min; writes benchmarks/results/setup_bench/<date>_<cpu>.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def timed_setup(clone: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["make", "setup"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="kto-setup-bench-"))
    try:
        clone, home = work / "clone", work / "home"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "KTO_LOOP_HOME": str(home), "PIP_NO_CACHE_DIR": "1"}
        fresh = timed_setup(clone, env)
        again = timed_setup(clone, env)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor())
        out = {
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                        "load_avg_at_end": os.getloadavg()},
            "fresh_setup_s": round(fresh, 1), "repeat_setup_s": round(again, 2),
            "venv_bytes": du_bytes(clone / ".venv"), "model_home_bytes": du_bytes(home),
            "note": "new clone, new venv, PIP_NO_CACHE_DIR=1, new KTO_LOOP_HOME (model downloaded + converted)",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    dest = ROOT / "benchmarks" / "results" / "setup_bench.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
