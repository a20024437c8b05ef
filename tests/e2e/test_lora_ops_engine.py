"""lorafleet's vLLM plugin in a real CPU engine: the same greedy tokens as vLLM's own LoRA ops, token for token.

Two engines, one after the other, each in a process of its own (vLLM reads the plugin's setting when its
engine process starts): ``LORAFLEET_LORA_OPS=vllm``, then ``grouped``. Each gets the same batches from two
real adapters and the base model, with two adapter slots:

- one adapter alone (the single-slot path, prefill and decode);
- the first adapter beside the base model (rows without an adapter; the second slot still free);
- both adapters and the base model in one batch (the mixed decode form; every slot taken).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ORDERS, ROOT, session_gateway_steps_aside

pytestmark = pytest.mark.e2e

ENGINE = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

base, adapters, asks = json.loads(sys.argv[1])
llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=2, max_model_len=1024, seed=0)
tokenizer = llm.get_tokenizer()
prompts = [
    tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True)
    for a in asks
]
loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(adapters)]
params = SamplingParams(temperature=0.0, max_tokens=32)
batches = {
    "one adapter": [loras[0]] * len(prompts),
    "adapter and base": [loras[0] if i % 2 else None for i in range(len(prompts))],
    "two adapters and base": [(loras + [None])[i % 3] for i in range(len(prompts))],
}
out = {}
for name, requests in batches.items():
    done = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
    out[name] = [list(o.outputs[0].token_ids) for o in done]
print("RESULT " + json.dumps(out))
"""


def run_engine(ops: str, base: Path, adapters: list[Path], prompts: list[str]) -> tuple[dict[str, Any], str]:
    env = os.environ | {"LORAFLEET_LORA_OPS": ops, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, json.dumps([str(base), [str(a) for a in adapters], prompts])],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :]), done.stdout + done.stderr  # vLLM logs to stdout by default


@pytest.fixture(scope="module")
def both(base_model: Path, tiny_adapter: Path, tiny_toolcall_adapter: Path) -> dict[str, tuple[dict, str]]:
    session_gateway_steps_aside()  # one engine at a time on a small machine
    rows = [json.loads(line) for line in (ORDERS / "test.jsonl").read_text().splitlines()[:12]]
    prompts = [r["instruction"] for r in rows]
    adapters = [tiny_adapter, tiny_toolcall_adapter]
    return {ops: run_engine(ops, base_model, adapters, prompts) for ops in ("vllm", "grouped")}


def test_the_plugin_runs_in_the_engine_and_only_when_chosen(both: dict[str, tuple[dict, str]]) -> None:
    assert "lorafleet LoRA ops: grouped (vLLM 0.32.0, CPU)" in both["grouped"][1]
    assert "Using GroupedPunicaWrapperCPU" in both["grouped"][1]
    assert "lorafleet LoRA ops stand aside: LORAFLEET_LORA_OPS=vllm" in both["vllm"][1]
    assert "Using PunicaWrapperCPU" in both["vllm"][1]


def test_greedy_tokens_are_vllms_own_token_for_token(both: dict[str, tuple[dict, str]]) -> None:
    stock, grouped = both["vllm"][0], both["grouped"][0]
    assert grouped["one adapter"] == stock["one adapter"]
    assert grouped["adapter and base"] == stock["adapter and base"]
    # Every slot taken: the adapters' rows agree; a row without an adapter is the base model's in the grouped
    # ops (vLLM's torch ops read its index, -1, as the last slot: lorafleet_vllm.ops).
    mixed_stock, mixed = stock["two adapters and base"], grouped["two adapters and base"]
    adapter_rows = [i for i in range(len(mixed)) if i % 3 != 2]
    assert [mixed[i] for i in adapter_rows] == [mixed_stock[i] for i in adapter_rows]
    base_alone = {i: grouped["adapter and base"][i] for i in range(0, len(mixed), 2)}  # even rows had no adapter
    for i in range(2, len(mixed), 3):
        if i in base_alone:
            assert mixed[i] == base_alone[i]
    # The adapter changes the answers: the comparison is not between two copies of the base model.
    assert any(grouped["one adapter"][i] != base_alone[i] for i in base_alone)
