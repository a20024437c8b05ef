"""vLLM's CPU LoRA ops against lorafleet's grouped ops, op by op, on SmolLM2-135M's shapes.

    python -m benchmarks.lora_ops [--threads 1] [--repeats 200]

Each of vLLM's ops (``vllm.lora.ops.torch_ops``: ``bgmv_*`` for decode,
``sgmv_*`` for prefill with vLLM's own segment metadata from ``compute_meta``)
and the grouped op that replaces it (``lorafleet_vllm.ops``: ``shrink`` and
``expand`` per slot; ``decode_shrink``/``decode_expand`` for a decode batch
that mixes adapters) on the same inputs: bf16 activations and weights, the
fp32 buffer vLLM's punica wrapper uses between them, rank 16, four adapter
slots. Shapes: the hidden size 576 (q/o/gate/up in, q/o out), 192 (k/v out)
and 1536 (down in, gate/up out). Batches: 8 decode tokens of one adapter, 8
decode tokens of four adapters in turn, 512 prefill tokens in four sequences of
128, one per adapter. Median over ``--repeats`` calls after a warm-up; the
results are compared as the tests compare them (tests/unit/test_lora_ops.py).
The batched decode forms get their weights' layout built beforehand, as the
plugin keeps it between steps (``ops.Weights``).

Then a decode step's LoRA, layer by layer: vLLM's CPU punica wrapper against
the plugin's (``add_lora_linear``, a shrink and an expand per slice in vLLM's,
one of each over the fused slices in the plugin's) for SmolLM2's four LoRA
layers per decoder layer (q/k/v fused, o, gate/up fused, down), and the step's
total over its 30 decoder layers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

RANK, SLOTS = 16, 4
SHAPES = [("shrink", 576), ("shrink", 1536), ("expand", 192), ("expand", 576), ("expand", 1536)]
BATCHES = {
    "decode 8, one adapter": [0] * 8,
    "decode 8, four adapters": [0, 1, 2, 3] * 2,
    "prefill 512, four adapters": [s for s in range(4) for _ in range(128)],
}


def median_us(call: Callable[[], None], repeats: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e6


def cases(kind: str, features: int, tokens: list[int]) -> tuple[Callable[[], None], Callable[[], None], str]:
    """vLLM's call and the grouped call for one op, shape and batch, and the grouped form's name."""
    from vllm.lora.ops import torch_ops as stock
    from vllm.lora.punica_wrapper.utils import compute_meta

    from lorafleet_vllm import ops

    indices = torch.tensor(tokens)
    decode = len(tokens) <= 64
    meta = compute_meta(indices)[:6]
    rows = ops.Rows.of_tokens(indices)
    mixed = decode and rows.single is None
    g = torch.Generator().manual_seed(0)
    if kind == "shrink":
        x = torch.randn(len(tokens), features, generator=g).bfloat16()
        w = torch.randn(SLOTS, 1, RANK, features, generator=g).bfloat16()
        y = torch.zeros(len(tokens), RANK)
        if decode:
            theirs = lambda: stock.bgmv_shrink(x, w, y, indices, 1.0)  # noqa: E731
        else:
            theirs = lambda: stock.sgmv_shrink(x, w, y, *meta, 1.0)  # noqa: E731
        if mixed:
            every = ops.every_a(w).float()
            return theirs, lambda: ops.decode_shrink(x, w, y, rows, 1.0, every), "decode_shrink"
        return theirs, lambda: ops.shrink(x, w, y, rows, 1.0), "shrink"
    buffer = torch.randn(len(tokens), RANK, generator=g)
    w = torch.randn(SLOTS, 1, features, RANK, generator=g).bfloat16()
    out = torch.zeros(len(tokens), features).bfloat16()
    if decode:
        theirs = lambda: stock.bgmv_expand_slice(buffer, w, out, indices, 0, features, True)  # noqa: E731
    else:
        theirs = lambda: stock.sgmv_expand_slice(buffer, w, out, *meta, 0, features, True)  # noqa: E731
    if mixed:
        every = ops.every_b(w)
        return theirs, lambda: ops.decode_expand(buffer, w, out, rows, 0, features, True, every), "decode_expand"
    return theirs, lambda: ops.expand(buffer, w, out, rows, 0, features, True), "expand"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"vLLM's torch ops (baseline) against lorafleet's grouped ops; bf16, rank {RANK}, {SLOTS} slots, "
        f"{args.threads} thread(s), median of {args.repeats} calls"
    )
    print(f"{'batch':<28} {'op':<8} {'features':>8} {'vLLM µs':>9} {'grouped µs':>11} {'speed-up':>9}  grouped form")
    for batch, tokens in BATCHES.items():
        for kind, features in SHAPES:
            theirs, ours, form = cases(kind, features, tokens)
            before, after = median_us(theirs, args.repeats), median_us(ours, args.repeats)
            print(f"{batch:<28} {kind:<8} {features:>8} {before:>9.1f} {after:>11.1f} {before / after:>8.1f}x  {form}")
    layer_table(args.repeats)


# SmolLM2-135M's LoRA layers per decoder layer: (input features, output slices).
LAYERS = {"q/k/v": (576, (576, 192, 192)), "o": (576, (576,)), "gate/up": (576, (1536, 1536)), "down": (1536, (576,))}
DECODER_LAYERS = 30
STEPS = {
    "decode 8, one adapter": [0] * 8,
    "decode 8, four adapters": [0, 1, 2, 3] * 2,
    "decode 8, base model only": [-1] * 8,
}


def layer_table(repeats: int) -> None:
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from lorafleet_vllm.punica import GroupedPunicaWrapperCPU

    print(
        f"\nA decode step's LoRA, per layer (add_lora_linear through each punica wrapper), µs; step: x{DECODER_LAYERS}"
    )
    print(f"{'batch':<28} {'layer':<8} {'vLLM µs':>9} {'plugin µs':>10} {'speed-up':>9}")
    for batch, tokens in STEPS.items():
        # is_prefill=True: as vLLM V1's runner marks every step (its sgmv forms, and their skip of a batch without LoRA)
        mapping = LoRAMapping(tuple(t + 1 for t in tokens), tuple(t + 1 for t in tokens), is_prefill=True)
        wrappers = []
        for kind in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
            wrapper = kind(max_num_batched_tokens=1024, max_batches=64, device="cpu")
            wrapper.update_metadata(mapping, list(range(1, SLOTS + 1)), SLOTS, 1000)
            wrappers.append(wrapper)
        totals = [0.0, 0.0]
        g = torch.Generator().manual_seed(0)
        for layer, (features, sizes) in LAYERS.items():
            x = torch.randn(len(tokens), features, generator=g).bfloat16()
            a = tuple(torch.randn(SLOTS, 1, RANK, features, generator=g).bfloat16() for _ in sizes)
            b = tuple(torch.randn(SLOTS, 1, size, RANK, generator=g).bfloat16() for size in sizes)
            y = torch.zeros(len(tokens), sum(sizes)).bfloat16()
            times = [median_us(partial(w.add_lora_linear, y, x, a, b, 1.0, sizes), repeats) for w in wrappers]
            totals = [t + u for t, u in zip(totals, times, strict=True)]
            print(f"{batch:<28} {layer:<8} {times[0]:>9.1f} {times[1]:>10.1f} {times[0] / times[1]:>8.1f}x")
        step = [t * DECODER_LAYERS / 1000 for t in totals]
        print(f"{batch:<28} {'step ms':<8} {step[0]:>9.2f} {step[1]:>10.2f} {step[0] / step[1]:>8.1f}x")


if __name__ == "__main__":
    main()
