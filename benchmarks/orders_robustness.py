"""The orders recipe before and after the wide rows, in one run: training time, and quality on both splits.

    python -m benchmarks.orders_robustness                 # make bench-orders (about an hour on 2 cores)
    python -m benchmarks.orders_robustness --max-steps 60  # a quicker look

1. Trains ``configs/orders.yaml`` twice, one after the other, each in its own
   ``lorafleet train`` process on an otherwise idle machine: on the first
   release's rows (the first 1600 lines of ``data/orders/train.jsonl``, the
   baseline) and on the whole file (those rows and the wide ones: the shipped
   recipe). Same config, seed, steps and batch size; the wall time of each.
2. Publishes both into a scratch store under ``--out`` and scores them in one
   ``lorafleet eval`` on the in-distribution test split and the robustness
   split (``--robust``), both modes.
3. Prints one table: each recipe's training time and, per split and mode,
   schema-valid rate, exact match and field accuracy; the JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ROOT / "data/orders"
CONFIG = ROOT / "configs/orders.yaml"
BASE_ROWS = 1600  # the first release's train split: the first lines of train.jsonl


def lorafleet(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "lorafleet", *args], check=True, env=env, cwd=ROOT)


def train(name: str, data: Path, out: Path, env: dict[str, str], max_steps: int | None) -> float:
    started = time.perf_counter()
    steps = ["--max-steps", str(max_steps)] if max_steps else []
    lorafleet("train", "--config", str(CONFIG), "--data", str(data), "--out", str(out / name), *steps, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "var/bench/orders-robustness")
    parser.add_argument("--max-steps", type=int, help="override the recipe's steps (both runs)")
    parser.add_argument("--limit", type=int, help="score only the first N rows of each split")
    parser.add_argument("--train-only", action="store_true", help="time the two trainings, score nothing")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    data_dir = out / "data"
    (data_dir / "models").parent.mkdir(parents=True, exist_ok=True)
    models = Path(os.environ.get("LORAFLEET_DATA_DIR", ROOT / "var")).resolve() / "models"
    if not (data_dir / "models").exists():
        (data_dir / "models").symlink_to(models, target_is_directory=True)
    env = os.environ | {"LORAFLEET_DATA_DIR": str(data_dir)}

    before = out / "train-first-release.jsonl"
    lines = (ORDERS / "train.jsonl").read_text("utf-8").splitlines(keepends=True)
    before.write_text("".join(lines[:BASE_ROWS]), "utf-8")
    splits = {"test": ORDERS / "test.jsonl", "robust": ORDERS / "robust.jsonl"}
    if args.limit:
        for name, path in list(splits.items()):
            cut = out / f"{name}-{args.limit}.jsonl"
            cut.write_text("".join(path.read_text("utf-8").splitlines(keepends=True)[: args.limit]), "utf-8")
            splits[name] = cut

    runs = {"first-release": before, "shipped": ORDERS / "train.jsonl"}
    seconds = {name: train(name, data, out / "runs", env, args.max_steps) for name, data in runs.items()}
    print("\n| recipe | rows | steps | training (s) | tokens seen |\n|---|---:|---:|---:|---:|")
    for name, data in runs.items():
        final = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()][-1]
        rows_n = len(data.read_text("utf-8").splitlines())
        print(f"| {name} | {rows_n} | {final['step']} | {seconds[name]:.0f} | {final['num_input_tokens_seen']:.0f} |")
    print(f"\ntraining time, shipped / first release: {seconds['shipped'] / seconds['first-release']:.2f}x")
    if args.train_only:
        return
    for name in runs:
        lorafleet("adapters", "publish", str(out / "runs" / name), f"orders-{name}", env=env)
    targets = [arg for name in runs for arg in ("--target", f"orders-{name}")]
    schema = ["--schema", str(ORDERS / "schema.json")]
    held_out = ["--data", str(splits["test"]), "--robust", str(splits["robust"])]
    lorafleet("eval", *held_out, *schema, *targets, "--out", str(out / "eval"), env=env)
    rows = []
    for split, report in (("test", out / "eval/report.json"), ("robust", out / "eval/robust/report.json")):
        for r in json.loads(report.read_text())["results"]:
            rows.append({"split": split} | {k: r[k] for k in ("target", "mode", "n", "field_accuracy")})
            rows[-1] |= {k: r[k]["value"] for k in ("schema_valid_rate", "exact_match_rate")}
    (out / "results.json").write_text(json.dumps({"train_s": seconds, "rows": rows}, indent=2) + "\n")
    print("\n| recipe | training (s) | split | mode | n | schema-valid | exact match | field acc. |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["target"], r["split"] != "test", r["mode"])):
        recipe = r["target"].removeprefix("orders-").split("@")[0]
        print(
            f"| {recipe} | {seconds[recipe]:.0f} | {r['split']} | {r['mode']} | {r['n']} | "
            f"{r['schema_valid_rate']:.1%} | {r['exact_match_rate']:.1%} | {r['field_accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
