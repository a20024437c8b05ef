"""Does averaging adapters trained on different seeds beat each one alone?

    lorafleet train --config configs/toolcall.yaml --seed 1 --out var/runs/toolcall-s1      # and seed 2
    python -m benchmarks.adapter_soup var/runs/toolcall var/runs/toolcall-s1 var/runs/toolcall-s2

Loads the adapters onto one base model and adds two "soups" of them with peft's
``add_weighted_adapter``: ``soup``, the exact mean of their weight updates
(``cat``: the ranks add up, 3 x 16 = 48), and ``soup16``, that mean cut back to
the shipped rank by SVD. Every adapter and both soups then answer the held-out
toolcall questions greedily, unconstrained, scored with the shared judge
(``recipe_sweep.generate_and_score``), so one table compares them. It also
counts the questions one, two or all of the single adapters answer right: the
ceiling an ensemble of them could reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.recipe_sweep import generate_and_score, held_out_set


def agreement(calls_ok: list[list[bool]]) -> dict[str, int]:
    """How many questions at least one, a majority, and all of the adapters answer right."""
    per_question = [sum(oks) for oks in zip(*calls_ok, strict=True)]
    return {
        "any": sum(k > 0 for k in per_question),
        "majority": sum(2 * k > len(calls_ok) for k in per_question),
        "all": sum(k == len(calls_ok) for k in per_question),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", type=Path, nargs="+", help="adapter directories (same base model and rank)")
    parser.add_argument("--model", default=None, help="base model directory (default: the provisioned one)")
    parser.add_argument("--limit", type=int, default=0, help="score the first N held-out questions only (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows (with each verdict) here, JSONL")
    args = parser.parse_args()
    if len(args.adapters) < 2:
        parser.error("give at least two adapter directories to average")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contract.settings import CommonSettings

    base = args.model or str(CommonSettings().base_model_path())
    evalset = held_out_set(args.limit)
    tokenizer = AutoTokenizer.from_pretrained(base)
    names = [f"seed-run-{i}" for i in range(len(args.adapters))]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(args.adapters[0]), adapter_name=names[0]
    )
    for name, path in zip(names[1:], args.adapters[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    rank = model.peft_config[names[0]].r
    weights = [1 / len(names)] * len(names)
    model.add_weighted_adapter(names, weights, "soup", combination_type="cat")
    model.add_weighted_adapter(names, weights, f"soup{rank}", combination_type="svd", svd_rank=rank)

    rows = []
    for name in ["soup", f"soup{rank}", *names]:
        model.set_adapter(name)
        scores = generate_and_score(model, tokenizer, evalset)
        if name in names:
            source = str(args.adapters[names.index(name)])
        else:
            source = f"mean of {len(names)}, rank {model.peft_config[name].r}"
        rows.append({"adapter": name, "source": source, **scores})
        print(f"{name}: call accuracy {100 * scores['call_accuracy']:.1f}%", flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(f"\nadapter soup: {len(evalset.examples)} held-out toolcall questions, greedy, unconstrained")
    print("| adapter | source | call accuracy | schema-valid |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['adapter']} | {r['source']} | {100 * r['call_accuracy']:.1f}% | {100 * r['schema_valid']:.1f}% |")
    counts = agreement([r["calls_ok"] for r in rows if r["adapter"] in names])
    print(
        f"single adapters: {counts['any']} questions right in at least one, {counts['majority']} in a majority, "
        f"{counts['all']} in all (of {len(evalset.examples)})"
    )


if __name__ == "__main__":
    main()
