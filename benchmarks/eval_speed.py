"""What the evaluation costs on top of vLLM: ``lorafleet eval``'s whole pipeline vs vLLM generating alone.

    python -m benchmarks.eval_speed [--examples 200] [--rounds 2] [--max-tokens 64]

Baseline ("vLLM alone"): ``LLM.chat`` on the same conversations with the same
sampling settings (greedy, ``max_tokens``), one batched call, outputs thrown
away. Candidate: what ``lorafleet eval`` does for one target and mode, end to
end: read and check the held-out file (schema included), render the prompts,
generate (batched, same settings), judge and score every output, and write
every report (json, md, png, failures, review sheet). Both use one in-process
engine with the demo ``orders`` adapter when it is published (else the base
model), interleaved per round so machine noise hits both alike. The goal: the
candidate takes at most 1.2x the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from contract.settings import CommonSettings
from contract.store import AdapterStore
from evaluation.report import write_report
from evaluation.run import Target, evaluate, load_examples, open_engine
from lorafleet.commands.model import require_base_model

ROOT = Path(__file__).resolve().parents[1]
DATA, SCHEMA = ROOT / "data/orders/test.jsonl", ROOT / "data/orders/schema.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    settings = CommonSettings()
    require_base_model(settings)
    base_model = settings.base_model_path()
    published = AdapterStore(settings.adapters_dir).serving("orders")
    target = Target(published.ref, published.path, published) if published else Target("base")

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test.jsonl"
        data.write_text("".join(DATA.read_text("utf-8").splitlines(keepends=True)[: args.examples]), "utf-8")
        llm = open_engine(base_model, 1 if target.path else 0)
        lora = LoRARequest(target.name, 1, str(target.path)) if target.path else None
        conversations = [e.messages for e in load_examples(data, SCHEMA).examples]
        params = SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens
        )  # what sampling_params() gives unconstrained

        def vllm_alone() -> None:
            llm.chat(conversations, params, lora_request=lora, use_tqdm=False)

        def lorafleet_eval() -> None:
            evalset = load_examples(data, SCHEMA)
            results = evaluate(evalset, [target], ["unconstrained"], base_model, max_tokens=args.max_tokens, llm=llm)
            write_report(results, evalset, Path(tmp) / "report")

        variants = {"vLLM alone (LLM.chat)": vllm_alone, "lorafleet eval (check+generate+judge+report)": lorafleet_eval}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        llm.chat(conversations[:8], params, lora_request=lora, use_tqdm=False)  # warm-up: load the adapter
        for _ in range(args.rounds):
            for name, run in variants.items():
                started = time.perf_counter()
                run()
                walls[name].append(time.perf_counter() - started)

    base = statistics.median(walls["vLLM alone (LLM.chat)"])
    print(
        f"\nevaluation speed: {args.examples} held-out orders examples, target {target.name}, unconstrained, greedy, "
        f"max_tokens {args.max_tokens}; median of {args.rounds} interleaved rounds"
    )
    print(f"{'pipeline':<46} | {'median s':>8} | {'min s':>7} | {'x baseline':>10}")
    print("-" * 82)
    for name, values in walls.items():
        med = statistics.median(values)
        print(f"{name:<46} | {med:>8.2f} | {min(values):>7.2f} | {med / base:>10.3f}")
    print("baseline: vLLM alone; goal: lorafleet eval <= 1.2x")


if __name__ == "__main__":
    main()
