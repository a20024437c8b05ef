"""Enforced JSON on real-world schemas: how often does constrained decoding trap the model?

    python -m benchmarks.enforced_json                        # make bench-json: the served orders adapter
    python -m benchmarks.enforced_json --adapter before=DIR --adapter after=DIR --set "email ends a sentence"

A JSON-Schema grammar that allows any whitespace between tokens lets a small
model that wants to stop (or is unsure) fill the gap with spaces and newlines
until ``max_tokens``. This benchmark sends each of the bundled real-world
schemas (``data/schemas/schemastore``: JSON Schema Store, Apache-2.0) to an
adapter with the schema enforced, once per structured-outputs configuration,
on in-process vLLM:

- ``auto, any whitespace``: vLLM's default (xgrammar, falling back to guidance);
- ``xgrammar, compact`` and ``guidance, compact``: ``disable_any_whitespace``;
- ``guidance, spaced`` (the default): json.dumps' separators and no other
  whitespace (llguidance's ``x-guidance`` options in each schema).

A second set asks for the adapter's own task with the email at the end of a
sentence (``... write to a@b.example.``), where an adapter that copies the full
stop cannot end its turn inside the string. For each: requests the backend
refused, answers cut at ``max_tokens``, answers valid against their schema,
median answer length, and the batch's wall time.

``--collect REPO`` rebuilds the schema folder from a checkout of
github.com/SchemaStore/schemastore (a seeded sample of the self-contained
object schemas of 0.8-12 KB).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from contract.judge import judge

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "data/schemas/schemastore"
ROBUST = ROOT / "data/orders/robust.jsonl"
ORDERS_SCHEMA = ROOT / "data/orders/schema.json"
# name: (LORAFLEET_JSON_BACKEND, LORAFLEET_JSON_WHITESPACE)
CONFIGS = {
    "auto, any whitespace": ("auto", "any"),
    "xgrammar, compact": ("xgrammar", "compact"),
    "guidance, compact": ("guidance", "compact"),
    "guidance, spaced": ("guidance", "spaced"),
}
SAMPLE = 48
SCHEMASTORE = "schemastore"
SENTENCE_END = "email ends a sentence"


def collect(repo: Path, out: Path = SCHEMAS, sample: int = SAMPLE) -> list[str]:
    """Copy a seeded sample of self-contained object schemas from a SchemaStore checkout (git objects at HEAD)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    eligible = []
    for line in git("ls-tree", "-r", "-l", "HEAD", "src/schemas/json").splitlines():
        meta, path = line.split("\t")
        size = meta.split()[3]
        if not size.isdigit() or not 800 <= int(size) <= 12000:
            continue
        try:
            schema = json.loads(git("show", f"HEAD:{path}"))
        except (json.JSONDecodeError, subprocess.CalledProcessError):
            continue
        refs = [r for r in _refs(schema) if not r.startswith("#")]
        if not refs and (schema.get("type") == "object" or "properties" in schema):
            eligible.append(path)
    random.Random(0).shuffle(eligible)
    chosen = sorted(eligible[:sample])
    out.mkdir(parents=True, exist_ok=True)
    for path in chosen:
        (out / Path(path).name).write_text(git("show", f"HEAD:{path}"), "utf-8")
    for name in ("LICENSE", "NOTICE"):
        (out / name).write_text(git("show", f"HEAD:{name}"), "utf-8")
    commit = git("rev-parse", "HEAD").strip()
    listing = "\n".join(f"- `{Path(p).name}`" for p in chosen)
    (out / "SOURCES.md").write_text(
        f"# Real-world JSON Schemas\n\n{len(chosen)} schemas from the JSON Schema Store "
        f"(https://github.com/SchemaStore/schemastore, commit {commit}, `src/schemas/json/`), unchanged; "
        "Apache License 2.0 (LICENSE, NOTICE). Chosen by `python -m benchmarks.enforced_json --collect REPO`: "
        f"a seeded sample of the self-contained (no external `$ref`) object schemas of 0.8-12 KB.\n\n{listing}\n",
        "utf-8",
    )
    return chosen


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


Request = tuple[str, dict, dict | None]  # (user message, schema, expected answer when known)


def schema_requests() -> list[Request]:
    """One request per bundled schema, as a user would type it."""
    requests: list[Request] = []
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text("utf-8"))
        what = schema.get("title") or schema.get("description", "").split("\n")[0] or path.stem
        requests.append((f"Write an example {what.rstrip('.')} as a JSON object.", schema, None))
    return requests


def sentence_end_requests() -> list[Request]:
    """The robustness split's rows whose email ends a sentence (followed by '.', '!' or '?')."""
    schema = json.loads(ORDERS_SCHEMA.read_text("utf-8"))
    requests: list[Request] = []
    for line in ROBUST.read_text("utf-8").splitlines():
        row = json.loads(line)
        expected = json.loads(row["output"])
        after = row["instruction"].split(expected["customer"]["email"], 1)[1][:1]
        if after and after in ".!?":
            requests.append((row["instruction"], schema, expected))
    return requests


def run_config(
    base_model: str, adapters: dict[str, Path], config: str, sets: dict[str, list[Request]], max_tokens: int
) -> list[dict]:
    """Every set for every adapter under one structured-outputs configuration, on an engine of its own."""
    import os

    from contract.settings import CommonSettings

    backend, whitespace = CONFIGS[config]
    settings = CommonSettings(json_backend=backend, json_whitespace=whitespace)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from evaluation.run import close_engine

    llm = LLM(
        model=base_model,
        enable_lora=True,
        max_lora_rank=16,
        max_loras=len(adapters),
        max_model_len=2048,
        seed=0,
        structured_outputs_config=settings.structured_outputs(),
    )
    tokenizer = llm.get_tokenizer()
    rows = []
    try:
        for lora_id, (label, path) in enumerate(adapters.items(), start=1):
            lora = LoRARequest(label, lora_id, str(path))
            for name, requests in sets.items():
                if name == SCHEMASTORE and lora_id > 1:
                    continue  # the schemas are nobody's task: the first adapter answers them
                measured = _run_set(llm, tokenizer, lora, requests, max_tokens, settings.json_layout)
                rows.append({"adapter": label, "set": name} | measured)
    finally:
        close_engine(llm)
    return rows


def _run_set(
    llm: Any, tokenizer: Any, lora: Any, requests: list[Request], max_tokens: int, layout: dict | None
) -> dict:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from contract.settings import laid_out

    prompts, params, kept, refused = [], [], [], 0
    for text, schema, expected in requests:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        enforce = StructuredOutputsParams(json=laid_out(schema, layout))
        try:  # the backend's own check, as the gateway's engine would answer it (a 400)
            llm.generate(
                prompt, SamplingParams(max_tokens=1, structured_outputs=enforce), lora_request=lora, use_tqdm=False
            )
        except Exception:
            refused += 1
            continue
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=enforce))
        kept.append((schema, expected))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False) if prompts else []
    wall = time.perf_counter() - started
    answers = [o.outputs[0] for o in outputs]
    verdicts = [judge(a.text, s, expected=e) for a, (s, e) in zip(answers, kept, strict=True)]
    # The end of turn the grammar forbids inside a string: the expected email, then more (the sentence's full
    # stop, the chat template's next-turn words, whitespace) in the same string.
    leaked = [
        a.text
        for a, (_, e) in zip(answers, kept, strict=True)
        if e and f'"{e["customer"]["email"]}' in a.text and f'"{e["customer"]["email"]}"' not in a.text
    ]
    return {
        "n": len(requests),
        "refused": refused,
        "cut": sum(a.finish_reason == "length" for a in answers),
        # cut while writing nothing but whitespace: the trap compact JSON closes
        "cut_in_whitespace": sum(a.finish_reason == "length" and not a.text[-24:].strip() for a in answers),
        "valid": sum(v.outcome == "valid" for v in verdicts),
        "exact": sum(bool(v.exact_match) for v in verdicts) if any(e for _, e in kept) else None,
        "median_tokens": statistics.median(len(a.token_ids) for a in answers) if answers else 0,
        "wall_s": round(wall, 1),
        "leaked": len(leaked) if any(e for _, e in kept) else None,
        "cut_examples": [a.text[-120:] for a in answers if a.finish_reason == "length"][:3],
        "leaked_examples": [text[-160:] for text in leaked][:3],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| configuration | adapter | set | n | refused | cut at max_tokens | of which in whitespace | valid | exact | "
        "email runs on | median tokens | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        answered = r["n"] - r["refused"]
        exact = "-" if r["exact"] is None else f"{r['exact']}/{answered}"
        leaked = "-" if r["leaked"] is None else f"{r['leaked']}/{answered}"
        lines.append(
            f"| {r['config']} | {r['adapter']} | {r['set']} | {r['n']} | {r['refused']} | "
            f"{r['cut']}/{answered} ({r['cut'] / max(answered, 1):.0%}) | {r['cut_in_whitespace']} | "
            f"{r['valid']}/{answered} | {exact} | "
            f"{leaked} | {r['median_tokens']:.0f} | {r['wall_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--adapter", action="append", default=[], help="LABEL=DIR; repeatable (default: the served orders)."
    )
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="default: all")
    parser.add_argument("--set", action="append", choices=[SCHEMASTORE, SENTENCE_END], help="default: both")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / "var/bench/enforced_json.json")
    parser.add_argument("--collect", type=Path, help="rebuild data/schemas/schemastore from this SchemaStore checkout")
    args = parser.parse_args()
    if args.collect:
        for name in collect(args.collect):
            print(name)
        return
    from contract.settings import CommonSettings
    from serving.state.ledger import open_store

    settings = CommonSettings()
    adapters = dict(a.split("=", 1) for a in args.adapter) if args.adapter else {}
    if not adapters:
        served = open_store(settings).serving("orders")
        if served is None:
            raise SystemExit("no orders adapter: run `make run` (or `lorafleet demo --no-serve`), or pass --adapter")
        adapters = {served.ref: served.path}
    every = {SCHEMASTORE: schema_requests, SENTENCE_END: sentence_end_requests}
    sets = {name: every[name]() for name in args.set or list(every)}
    rows = []
    for name in args.config or list(CONFIGS):
        for row in run_config(
            settings.base_model_path(), {k: Path(v) for k, v in adapters.items()}, name, sets, args.max_tokens
        ):
            rows.append({"config": name} | row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(table(rows))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
