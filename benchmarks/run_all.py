"""Run every benchmark program in turn (``make bench``)."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "benchmarks.train_speed",
    "benchmarks.engine_client",
    "benchmarks.gateway_overhead",
    "benchmarks.key_flood",
    "benchmarks.eval_speed",
    "benchmarks.fleet_routing",
    "benchmarks.finetune",
    "benchmarks.ship",
    "benchmarks.lora_ops",
    "benchmarks.lora_cpu",
]

if __name__ == "__main__":
    failed = [name for name in BENCHMARKS if subprocess.run([sys.executable, "-m", name]).returncode != 0]
    sys.exit(f"benchmarks failed: {failed}" if failed else 0)
