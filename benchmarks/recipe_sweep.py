"""Compare training recipes on a held-out set over several seeds: which change to the recipe really helps?

    python -m benchmarks.recipe_sweep --workers 12 --seeds 0,1,2 --out var/sweep          # on a GPU machine
    python -m benchmarks.recipe_sweep --only shipped,lr2e-3 --seeds 0 --out var/sweep      # two recipes, one seed

Each job trains one recipe (``RECIPES``: changes to ``configs/toolcall.yaml``)
with one seed through the project's own ``training.train.prepare``, then
generates the held-out answers greedily, unconstrained, with the trained model
still in memory (Hugging Face ``generate``: no adapter written, no engine
started) and scores them with the shared judge (``evaluation.scores``). Those
verdicts matched vLLM's on the shipped adapter, question for question, on the
24 held-out questions compared. One held-out question is worth one point in
98, and a recipe's figure moves by several points with the seed alone, so each
recipe runs on several seeds and the table shows their mean and every run.

Jobs run in ``--workers`` processes (seed by seed, so a time limit still
leaves every recipe's first seed). A 135M model trains in ~100 s per job on
one H200 shared by 12 workers; on a 2-core CPU each job takes ~12 minutes,
and a worker peaks near 12 GiB, so a 24 GiB machine runs one worker.

Written: ``<out>/results.jsonl`` (one row per job, with each question's
verdict; a later run with the same ``--out`` adds its rows, so more seeds can
follow) and the table of every row there on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from contract.examples import jsonl_text
from contract.tools import TOOLS_INSTRUCTION
from training.toolcall import BFCL_ANSWERS, BFCL_FILE, bfcl_rows, from_bfcl

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs/toolcall.yaml"
TEST = ROOT / "data/toolcall/test.jsonl"
ANSWERS = ROOT / "data/toolcall/test_answers.jsonl"

# Changes to the shipped recipe. "extra": the rows of --extra-bfcl (another BFCL category) added to the shipped ones;
# "omit_optional": training calls leave out the arguments BFCL lets be omitted (instead of the value it lists);
# "prompt": "signature" shows the functions as Python signatures (signature_prompt) instead of JSON specs.
RECIPES: dict[str, dict[str, Any]] = {
    "shipped": {},
    "lr5e-4": {"learning_rate": 5e-4},
    "lr2e-3": {"learning_rate": 2e-3},
    "extra96": {"extra": True},
    "extra160": {"extra": True, "max_steps": 160, "eval_every": 80},
    "r32": {"rank": 32, "alpha": 64},
    "neftune5": {"neftune": 5.0},
    "noval": {"val_fraction": 0.0, "eval_every": 0},
    "lr5e-4x192": {"learning_rate": 5e-4, "max_steps": 192, "eval_every": 96},
    "r64lr5e-4": {"rank": 64, "alpha": 128, "learning_rate": 5e-4},
    "r8": {"rank": 8, "alpha": 16},
    "dropout0.1": {"dropout": 0.1},
    "bs16": {"batch_size": 16},
    "wd0.1": {"weight_decay": 0.1},
    "extra160-neftune5": {"extra": True, "max_steps": 160, "eval_every": 80, "neftune": 5.0},
    "alpha16lr2e-3": {"alpha": 16, "learning_rate": 2e-3},
    "linear": {"scheduler": "linear"},
    "attention-only": {"targets": "attention", "learning_rate": 2e-3},
    "omit": {"omit_optional": True},
    "signature": {"prompt": "signature"},
    "omit-signature": {"omit_optional": True, "prompt": "signature"},
}
BFCL_SOURCE = ROOT.parent / "shared/data/toolcall"


def python_type(schema: dict[str, Any]) -> str:
    """A JSON Schema type as a Python annotation (``list[str]``, ``Literal['a', 'b']``)."""
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(v) for v in schema["enum"]) + "]"
    kind = schema.get("type")
    if kind == "array":
        return f"list[{python_type(schema.get('items') or {})}]"
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "object": "dict"}
    return names.get(kind, "Any") if isinstance(kind, str) else "Any"


def signature_prompt(functions: list[dict[str, Any]]) -> str:
    """The functions as Python signatures with docstrings (the ``signature`` recipes' prompt format)."""
    blocks = []
    for f in functions:
        params = f.get("parameters") or {}
        required = set(params.get("required") or [])
        props = params.get("properties") or {}
        args = [f"{n}: {python_type(p)}" + ("" if n in required else " = None") for n, p in props.items()]
        doc = [f"    {n}: {p.get('description', '')}".rstrip() for n, p in props.items()]
        blocks.append(
            f'def {f["name"]}({", ".join(args)}):\n    """{f.get("description", "")}\n\n' + "\n".join(doc) + '\n    """'
        )
    return TOOLS_INSTRUCTION + "\n\n".join(blocks)


def jobs(only: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    unknown = sorted(set(only) - set(RECIPES))
    if unknown:
        raise SystemExit(f"--only: no recipe named {unknown}; the recipes are {', '.join(RECIPES)}")
    return [(name, seed) for seed in seeds for name in RECIPES if not only or name in only]


def config_values(name: str, seed: int, extra: list[Path] | None, work: Path) -> tuple[dict[str, Any], float | None]:
    """The shipped config with the recipe's changes; (values, NEFTune alpha or None)."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    change = dict(RECIPES[name])
    neftune = change.pop("neftune", None)
    change.pop("prompt", None)  # applied by the worker (use_prompt_format)
    if change.pop("omit_optional", False):
        omitted = work / "train-omit.jsonl"
        if not omitted.exists():
            train, _, _ = from_bfcl(BFCL_SOURCE / BFCL_FILE, BFCL_SOURCE / BFCL_ANSWERS, omit_optional=True)
            omitted.write_text(jsonl_text(train), "utf-8")
        change["data"] = str(omitted)
    if change.pop("extra", False):
        if extra is None:
            raise ValueError(f"{name}: needs --extra-bfcl QUESTIONS ANSWERS (a BFCL category to add)")
        combined = work / "train+extra.jsonl"
        if not combined.exists():
            rows, _ = bfcl_rows(*extra)
            combined.write_text((ROOT / shipped["data"]).read_text("utf-8") + jsonl_text(rows), "utf-8")
        change["data"] = str(combined)
    values = shipped | change | {"seed": seed, "out": str(work / f"{name}-{seed}")}
    values["max_lora_rank"] = max(values.get("rank", 16), 16)
    return values, neftune


def generate_and_score(model: Any, tokenizer: Any, evalset: Any, batch: int = 32, max_new: int = 256) -> dict:
    """Greedy, unconstrained answers to every held-out question, judged like ``lorafleet eval`` judges them."""
    import torch

    from evaluation.run import prompts_of
    from evaluation.scores import Generation, score

    prompts = prompts_of(evalset.examples, tokenizer)
    tokenizer.padding_side = "left"
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    generations = []
    model.eval()
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], add_special_tokens=False, padding=True, return_tensors="pt")
        enc = enc.to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
            )
        for ids in out[:, enc["input_ids"].shape[1] :].tolist():
            stopped = eos in ids
            ids = ids[: ids.index(eos)] if stopped else ids
            text = tokenizer.decode(ids, skip_special_tokens=True)
            generations.append(Generation(text, "stop" if stopped else "length", 0.0, len(ids)))
    scored = [
        score(g, expected=e.completion, schema=e.schema, ground_truth=t)
        for e, t, g in zip(evalset.examples, evalset.ground_truth, generations, strict=True)
    ]
    n = len(scored)
    return {
        "call_accuracy": sum(bool(s.call_ok) for s in scored) / n,
        "schema_valid": sum(s.verdict.outcome == "valid" for s in scored) / n,
        "truncated": sum(s.verdict.outcome == "truncated" for s in scored) / n,
        "calls_ok": [bool(s.call_ok) for s in scored],
    }


def use_prompt_format(name: str | None) -> None:
    """Present tools to the model in the recipe's prompt format, for training and scoring alike.

    An experiment only: ``contract.prompt.with_tools`` (which both call) looks the
    renderer up in its module, so the worker swaps it there. Serving knows only
    the shipped format (``contract.tools.TOOLS_FORMAT``).
    """
    import contract.prompt
    import contract.tools

    renderer = signature_prompt if name == "signature" else contract.tools.tools_system_prompt
    contract.prompt.tools_system_prompt = renderer


def held_out_set(limit: int = 0) -> Any:
    """The held-out toolcall questions with BFCL's answers; the first ``limit`` only when given (a smoke run)."""
    from evaluation.run import load_examples

    evalset = load_examples(TEST, None, ANSWERS)
    if limit:
        evalset.examples, evalset.ground_truth = evalset.examples[:limit], evalset.ground_truth[:limit]
    return evalset


def run_worker(args: argparse.Namespace) -> None:
    from training.config import TrainConfig
    from training.train import prepare

    evalset = held_out_set(args.limit)
    work = args.out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    results = args.out / f"results.{args.worker}.jsonl"
    for k, (name, seed) in enumerate(jobs(args.only, args.seeds)):
        if k % args.workers != args.worker:
            continue
        started = time.perf_counter()
        try:
            use_prompt_format(RECIPES[name].get("prompt"))
            values, neftune = config_values(name, seed, args.extra_bfcl, work)
            if args.max_steps:
                values |= {"max_steps": args.max_steps, "eval_every": 0}
            cfg = TrainConfig.model_validate(values)
            trainer = prepare(cfg, args.model, Path(values["out"] + ".partial")).trainer
            trainer.neftune_noise_alpha = neftune  # read by Trainer.train()
            trainer.train()
            trained = time.perf_counter() - started
            row = {
                "recipe": name,
                "seed": seed,
                **generate_and_score(trainer.model, trainer.processing_class, evalset),
                "train_s": round(trained, 1),
                "total_s": round(time.perf_counter() - started, 1),
            }
        except Exception as exc:  # one failed recipe must not end the sweep
            row = {"recipe": name, "seed": seed, "error": repr(exc), "trace": traceback.format_exc()[-2000:]}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("calls_ok", "trace")}), flush=True)


def table(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = defaultdict(list)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"error: {r['recipe']} seed {r['seed']}: {r['error'][:300]}")
        else:
            by[r["recipe"]].append(r)

    def pct(rs: list[dict], key: str) -> str:
        runs = " / ".join(f"{100 * r[key]:.1f}" for r in sorted(rs, key=lambda r: r["seed"]))
        return f"{100 * statistics.fmean(r[key] for r in rs):.1f} ({runs})"

    lines += [
        "| recipe | seeds | call accuracy, mean (each seed) | schema-valid, mean (each seed) |",
        "|---|---:|---|---|",
    ]
    for name, rs in sorted(by.items(), key=lambda kv: -statistics.fmean(r["call_accuracy"] for r in kv[1])):
        lines.append(f"| {name} | {len(rs)} | {pct(rs, 'call_accuracy')} | {pct(rs, 'schema_valid')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="base model directory (default: the provisioned one)")
    parser.add_argument("--out", type=Path, default=ROOT / "var/sweep")
    parser.add_argument(
        "--extra-bfcl",
        type=Path,
        nargs=2,
        default=None,
        metavar=("QUESTIONS", "ANSWERS"),
        help="a BFCL category (questions and possible-answer files) for the extra* recipes",
    )
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="worker processes (one GPU takes many)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; unfinished jobs are dropped")
    parser.add_argument("--limit", type=int, default=0, help="score the first N held-out questions only (a smoke run)")
    parser.add_argument("--max-steps", type=int, default=0, help="override every recipe's steps (a smoke run)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from contract.settings import CommonSettings

        args.model = CommonSettings().base_model_path()
    if args.worker is not None:
        run_worker(args)
        return
    jobs(args.only, args.seeds)  # unknown recipe names fail here, before any worker starts
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("results.*.jsonl"):  # the workers' parts of an earlier, interrupted run
        old.unlink()
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "benchmarks.recipe_sweep", *sys.argv[1:]]
    workers = [
        subprocess.Popen(
            [*argv, "--worker", str(k)],
            cwd=ROOT,
            env=env,
            stdout=(args.out / f"worker{k}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for k in range(args.workers)
    ]
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    for proc in workers:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) if deadline else None)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(table(merge_parts(args.out)))


def merge_parts(out: Path) -> list[dict]:
    """Add the workers' rows (``results.<k>.jsonl``) to ``results.jsonl``; every row there, earlier runs' too."""
    parts = sorted(out.glob("results.*.jsonl"))
    with (out / "results.jsonl").open("a") as merged:
        for part in parts:
            merged.write("".join(line + "\n" for line in part.read_text().splitlines()))
            part.unlink()
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    main()
