"""lorafleet's grouped LoRA ops (lorafleet_vllm.ops) against vLLM's own CPU ops (vllm.lora.ops.torch_ops), on
the same inputs: shapes, dtypes, adapter counts, slot indices with the no-adapter index, add_inputs, scaling,
slices, and the segmented prefill forms with vLLM's own segment metadata (compute_meta).

Tolerance: both sides compute each product in the output's dtype from the same rounded inputs; they differ
only in the order a dot product of K terms is summed, so each element may differ by K * eps(fp32) * sum|x||w|,
plus, in a bf16 output, a rounding each way of the product and of the sum, and of a LoRA layer's
intermediate (rounded to bf16 before its expand): 3 * u * (|y| + sum|x||w|), u = 2**-8 for bf16 (2**-24 for
fp32).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet_vllm import ops

stock = pytest.importorskip("vllm.lora.ops.torch_ops")
from vllm.lora.punica_wrapper.utils import compute_meta  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def close(ours: torch.Tensor, theirs: torch.Tensor, magnitude: torch.Tensor, k: int) -> None:
    """Equal within the bound in the module docstring (``magnitude``: sum |x||w| per element, in fp64)."""
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[theirs.dtype]
    bound = k * 2.0**-23 * magnitude + 3 * u * (theirs.double().abs() + magnitude) + 1e-30
    diff = (ours.double() - theirs.double()).abs()
    worst = (diff - bound).max().item()
    assert worst <= 0, f"max excess over the bound {worst:.3g}; max diff {diff.max().item():.3g}"


@st.composite
def batches(draw: st.DrawFn, decode: bool) -> dict[str, Any]:
    """A batch as vLLM hands it to the ops: tokens with adapter slots (-1: none), stacked weights.

    When a row has no adapter, the last slot holds zeros, as it does in vLLM until an adapter is first loaded
    there; vLLM's torch ops read index -1 as that slot (test_no_adapter_means_none_even_when_every_slot_is_taken).
    """
    slots = draw(st.integers(1, 5))
    no_adapter = draw(st.booleans())
    usable = list(range(slots - 1 if no_adapter else slots)) + ([-1] if no_adapter else [])
    if decode:  # any order: one token per request
        tokens = draw(st.lists(st.sampled_from(usable), min_size=1, max_size=24))
    else:  # prefill: runs of one slot (a sequence's tokens), the same slot possibly again later
        longest = draw(st.sampled_from([12, 40]))  # 40: batches past the batched forms' 64 rows
        runs = draw(st.lists(st.tuples(st.sampled_from(usable), st.integers(1, longest)), min_size=1, max_size=5))
        tokens = [slot for slot, n in runs for _ in range(n)]
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    rank = draw(st.sampled_from([1, 4, 8, 16]))
    hidden = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    return {
        "slots": slots,
        "tokens": tokens,
        "dtype": dtype,
        "rank": rank,
        "hidden": hidden,
        "seed": seed,
        "no_adapter": no_adapter,
    }


def weights(b: dict[str, Any], out_features: int, in_features: int, four_d: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(b["seed"])
    w = torch.randn(b["slots"], 1, out_features, in_features, generator=g).to(b["dtype"])
    if b["no_adapter"]:
        w[-1] = 0
    return w if four_d else w.squeeze(1)


def inputs(b: dict[str, Any], features: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(b["seed"] + 1)
    return torch.randn(len(b["tokens"]), features, generator=g).to(dtype)


def magnitude(x: torch.Tensor, w: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    w = w.squeeze(1) if w.dim() == 4 else w
    picked = w.double().abs()[indices.clamp(min=0)] * (indices >= 0).view(-1, 1, 1)
    return torch.einsum("ti,toi->to", x.double().abs(), picked)


def forms(decode: bool) -> list[str]:
    return ["loop", "batched"] if decode else ["loop"]


@settings(max_examples=150, deadline=None)
@given(b=batches(decode=True), scaling=st.sampled_from([1.0, 0.5, 2.0, 0.125]), four_d=st.booleans())
def test_bgmv_shrink_matches_vllms(b: dict[str, Any], scaling: float, four_d: bool) -> None:
    indices = torch.tensor(b["tokens"])
    x = inputs(b, b["hidden"], b["dtype"])
    w = weights(b, b["rank"], b["hidden"], four_d)
    theirs = torch.full((len(indices), b["rank"]), 7.0)  # vLLM's buffer is fp32; the op overwrites it
    stock.bgmv_shrink(x, w, theirs, indices, scaling)
    rows = ops.Rows.of_tokens(indices)
    for shrink in (ops.shrink, ops.decode_shrink):
        ours = torch.full_like(theirs, 7.0)
        shrink(x, w, ours, rows, scaling)
        close(ours, theirs, magnitude(x, w, indices) * scaling, b["hidden"])


@settings(max_examples=150, deadline=None)
@given(
    b=batches(decode=True),
    add_inputs=st.booleans(),
    sliced=st.booleans(),
    offset=st.integers(0, 8),
    four_d=st.booleans(),
)
def test_bgmv_expand_and_its_slice_match_vllms(
    b: dict[str, Any], add_inputs: bool, sliced: bool, offset: int, four_d: bool
) -> None:
    indices = torch.tensor(b["tokens"])
    x = inputs(b, b["rank"], torch.float32)  # the shrink's fp32 buffer
    out_features = b["hidden"]
    w = weights(b, out_features, b["rank"], four_d)
    columns = out_features + offset if sliced else out_features
    start = inputs(b | {"seed": b["seed"] + 2}, columns, b["dtype"])
    theirs = start.clone()
    if sliced:
        stock.bgmv_expand_slice(x, w, theirs, indices, offset, out_features, add_inputs)
    else:
        stock.bgmv_expand(x, w, theirs, indices, add_inputs)
    mag = torch.zeros(len(indices), columns, dtype=torch.float64)
    at = slice(offset, offset + out_features) if sliced else slice(0, out_features)
    mag[:, at] = magnitude(x.to(b["dtype"]), w, indices)
    rows = ops.Rows.of_tokens(indices)
    for expand in (ops.expand, ops.decode_expand):
        ours = start.clone()
        if sliced:
            expand(x, w, ours, rows, offset, out_features, add_inputs)
        else:
            expand(x, w, ours, rows, add_inputs=add_inputs)
        close(ours, theirs, mag, b["rank"])


@settings(max_examples=100, deadline=None)
@given(b=batches(decode=False), scaling=st.sampled_from([1.0, 0.5]), add_inputs=st.booleans())
def test_the_segmented_prefill_forms_match_vllms(b: dict[str, Any], scaling: float, add_inputs: bool) -> None:
    """sgmv_shrink, sgmv_expand and sgmv_expand_slice with vLLM's own segment metadata for the batch."""
    indices = torch.tensor(b["tokens"])
    starts, lengths, slots, batches_, max_len, token_nums, _ = compute_meta(indices)
    meta = (starts, lengths, slots, batches_, max_len, token_nums)
    rows = ops.Rows.of_segments(starts, lengths, slots, batches_)
    assert rows.tokens == len(indices) and torch.equal(rows.slots, indices)
    x = inputs(b, b["hidden"], b["dtype"])
    a = weights(b, b["rank"], b["hidden"])
    theirs = torch.zeros(len(indices), b["rank"])
    stock.sgmv_shrink(x, a, theirs, *meta, scaling)
    ours = torch.zeros_like(theirs)
    ops.shrink(x, a, ours, rows, scaling)
    close(ours, theirs, magnitude(x, a, indices) * scaling, b["hidden"])

    bw = weights(b | {"seed": b["seed"] + 3}, b["hidden"], b["rank"])
    start = inputs(b | {"seed": b["seed"] + 4}, 2 * b["hidden"], b["dtype"])
    mag = magnitude(theirs.to(b["dtype"]), bw, indices)
    for offset in (0, b["hidden"]):
        expected, got = start.clone(), start.clone()
        stock.sgmv_expand_slice(theirs, bw, expected, *meta, offset, b["hidden"], add_inputs)
        ops.expand(theirs, bw, got, rows, offset, b["hidden"], add_inputs)
        whole = torch.zeros_like(start, dtype=torch.float64)
        whole[:, offset : offset + b["hidden"]] = mag
        close(got, expected, whole, b["rank"])
    expected, got = start.clone(), start.clone()
    stock.sgmv_expand(theirs, bw, expected, *meta, add_inputs)
    ops.expand(theirs, bw, got, rows, add_inputs=add_inputs)
    whole = torch.zeros_like(start, dtype=torch.float64)
    whole[:, : b["hidden"]] = mag
    close(got, expected, whole, b["rank"])


def test_no_adapter_means_none_even_when_every_slot_is_taken() -> None:
    """vLLM documents index -1 as "no LoRA"; its torch ops index with it, which is the last slot. Until an
    adapter is first loaded there it holds zeros and the two agree; from then on (vLLM does not clear a slot
    when it unloads an adapter), vLLM's ops apply that adapter to rows that asked for none, and the grouped
    ops still apply none."""
    x = torch.randn(3, 32)
    a = torch.randn(2, 1, 8, 32)  # both slots taken
    indices = torch.tensor([0, -1, 1])
    theirs, ours = torch.zeros(3, 8), torch.zeros(3, 8)
    stock.bgmv_shrink(x, a, theirs, indices, 1.0)
    ops.shrink(x, a, ours, ops.Rows.of_tokens(indices), 1.0)
    assert torch.allclose(ours[[0, 2]], theirs[[0, 2]], atol=1e-5)
    assert torch.count_nonzero(ours[1]) == 0
    assert torch.allclose(theirs[1], x[1] @ a[1, 0].T, atol=1e-5)  # the last adapter, on a row without one


def test_the_ops_under_test_are_the_ones_engines_run() -> None:
    """vLLM's oneDNN matmul is there (the plugin's add_lora_linear runs on it; without it, torch.mm's path),
    and a batch the step's metadata does not describe goes to vLLM's own op, unchanged."""
    from lorafleet_vllm.punica import GroupedPunicaWrapperCPU

    assert ops.onednn_available()
    stock_wrapper, grouped = wrappers([0, 0, 1], [0, 0, 1], True, 2)
    assert isinstance(grouped, GroupedPunicaWrapperCPU)
    x, a = torch.randn(5, 16), torch.randn(2, 1, 4, 16)  # 5 rows, metadata for 3: vLLM's op decides
    with pytest.raises(RuntimeError):
        stock_wrapper.add_shrink((torch.zeros(5, 4),), x, (a,), 1.0)
    with pytest.raises(RuntimeError):
        grouped.add_shrink((torch.zeros(5, 4),), x, (a,), 1.0)


def test_rows_group_by_slot_with_views_where_contiguous() -> None:
    rows = ops.Rows.of_tokens(torch.tensor([2, 2, -1, 0, 0, 2]))
    groups = dict(rows.groups)
    assert groups[-1] == slice(2, 3) and groups[0] == slice(3, 5)
    assert torch.equal(groups[2], torch.tensor([0, 1, 5]))  # two runs: gathered
    assert rows.tokens == 6 and rows.single is None
    assert ops.Rows.of_tokens(torch.tensor([1, 1, 1])).single == 1


@pytest.fixture
def platform() -> Any:
    from vllm.platforms import current_platform

    kind = type(current_platform)
    before = kind.__dict__["get_punica_wrapper"]
    yield kind
    kind.get_punica_wrapper = before


def test_the_plugin_points_the_cpu_engine_at_the_grouped_wrapper(
    platform: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import lorafleet_vllm
    from lorafleet_vllm.punica import GroupedPunicaWrapperCPU

    stock_wrapper = platform.get_punica_wrapper()
    assert stock_wrapper == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    caplog.set_level(logging.INFO, logger="vllm.lorafleet")
    for choice, says in (("vllm", "LORAFLEET_LORA_OPS=vllm"), ("fast", "'fast' is not one of grouped, vllm")):
        monkeypatch.setenv("LORAFLEET_LORA_OPS", choice)
        lorafleet_vllm.register()
        assert platform.get_punica_wrapper() == stock_wrapper and says in caplog.text
    monkeypatch.setenv("LORAFLEET_LORA_OPS", "grouped")
    monkeypatch.setattr("vllm.__version__", "0.33.0")
    lorafleet_vllm.register()
    assert platform.get_punica_wrapper() == stock_wrapper
    assert "verified against vLLM 0.32.0, this is 0.33.0" in caplog.text
    monkeypatch.undo()
    lorafleet_vllm.register()
    assert platform.get_punica_wrapper() == lorafleet_vllm.WRAPPER
    assert "lorafleet LoRA ops: grouped" in caplog.text
    module, name = lorafleet_vllm.WRAPPER.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[name]), name) is GroupedPunicaWrapperCPU


def test_the_plugin_is_registered_where_vllm_looks() -> None:
    from importlib.metadata import entry_points

    [plugin] = [e for e in entry_points(group="vllm.general_plugins") if e.name == "lorafleet_lora_ops"]
    assert plugin.value == "lorafleet_vllm:register"


def wrappers(tokens: list[int], requests: list[int], prefill: bool, slots: int) -> tuple[Any, Any]:
    """vLLM's CPU punica wrapper and the grouped one, with the same metadata for a batch (vLLM's slot indices
    are built from LoRA ids: slot s holds id s + 1, id 0 is no adapter)."""
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from lorafleet_vllm.punica import GroupedPunicaWrapperCPU

    mapping = LoRAMapping(tuple(t + 1 for t in tokens), tuple(r + 1 for r in requests), is_prefill=prefill)
    made = []
    for kind in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        wrapper = kind(max_num_batched_tokens=256, max_batches=64, device="cpu")
        wrapper.update_metadata(mapping, list(range(1, slots + 1)), slots, 1000)
        made.append(wrapper)
    return made[0], made[1]


def layer(b: dict[str, Any], sizes: tuple[int, ...]) -> tuple[torch.Tensor, tuple, tuple, torch.Tensor]:
    """A LoRA layer's input, its slices' stacked A and B weights, and the base layer's output."""
    x = inputs(b, b["hidden"], b["dtype"])
    lora_a = tuple(weights(b | {"seed": b["seed"] + i}, b["rank"], b["hidden"]) for i in range(len(sizes)))
    lora_b = tuple(weights(b | {"seed": b["seed"] + 9 + i}, size, b["rank"]) for i, size in enumerate(sizes))
    return x, lora_a, lora_b, inputs(b | {"seed": b["seed"] + 7}, sum(sizes), b["dtype"])


@settings(max_examples=60, deadline=None)
@given(
    b=batches(decode=False),
    prefill=st.booleans(),
    sizes=st.sampled_from([(24,), (16, 8, 8), (20, 20)]),
    scale=st.sampled_from([1.0, 0.5]),
)
def test_the_wrapper_gives_vllms_layer_outputs(
    b: dict[str, Any], prefill: bool, sizes: tuple[int, ...], scale: float
) -> None:
    """A whole LoRA layer (add_lora_linear: a shrink and an expand per slice, fused in the grouped wrapper; with
    vLLM's scale of 1.0, on vLLM's oneDNN matmul), prefill or decode, through the same punica metadata as
    vLLM's wrapper."""
    tokens = b["tokens"]
    stock_wrapper, grouped = wrappers(tokens, tokens, prefill, b["slots"])
    x, lora_a, lora_b, start = layer(b, sizes)
    theirs, ours = start.clone(), start.clone()
    stock_wrapper.add_lora_linear(theirs, x, lora_a, lora_b, scale, sizes)
    grouped.add_lora_linear(ours, x, lora_a, lora_b, scale, sizes)
    indices = torch.tensor(tokens)
    shrunk_magnitude = [magnitude(x, a, indices) * scale for a in lora_a]
    mag = torch.cat([magnitude(m, bw, indices) for m, bw in zip(shrunk_magnitude, lora_b, strict=True)], dim=1)
    close(ours, theirs, mag * 1.01, b["rank"] + b["hidden"])
    # vLLM loads an adapter into a slot in place: the fused and packed weights follow, A's and B's.
    for a in lora_a:
        a.mul_(2)
    for bw in lora_b:
        bw[:, :, :1].mul_(-1)
    theirs, ours = start.clone(), start.clone()
    stock_wrapper.add_lora_linear(theirs, x, lora_a, lora_b, scale, sizes)
    grouped.add_lora_linear(ours, x, lora_a, lora_b, scale, sizes)
    close(ours, theirs, mag * 2.02, b["rank"] + b["hidden"])


@settings(max_examples=40, deadline=None)
@given(b=batches(decode=True), prefill=st.booleans())
def test_the_wrapper_gives_vllms_logits_and_embeddings(b: dict[str, Any], prefill: bool) -> None:
    """add_lora_logits (per request: vLLM's sampler indices) and add_lora_embedding (an expand per token)."""
    tokens = b["tokens"]
    stock_wrapper, grouped = wrappers(tokens, tokens, prefill, b["slots"])
    x = inputs(b, b["hidden"], b["dtype"])
    a, bw = weights(b, b["rank"], b["hidden"]), weights(b | {"seed": b["seed"] + 1}, 40, b["rank"])
    start = inputs(b | {"seed": b["seed"] + 2}, 40, b["dtype"])
    theirs, ours = start.clone(), start.clone()
    stock_wrapper.add_lora_logits(theirs, x, a, bw, 1.0)
    grouped.add_lora_logits(ours, x, a, bw, 1.0)
    indices = torch.tensor(tokens)
    close(ours, theirs, magnitude(magnitude(x, a, indices), bw, indices) * 1.01, b["rank"] + b["hidden"])
    shrunk = inputs(b | {"seed": b["seed"] + 3}, b["rank"], b["dtype"])
    theirs, ours = start.clone(), start.clone()
    stock_wrapper.add_lora_embedding(theirs, shrunk, bw)
    grouped.add_lora_embedding(ours, shrunk, bw)
    close(ours, theirs, magnitude(shrunk, bw, indices), b["rank"])


@settings(max_examples=40, deadline=None)
@given(b=batches(decode=False), prefill=st.booleans(), sizes=st.sampled_from([(24,), (16, 8, 8)]))
def test_the_wrappers_separate_shrink_and_expand_give_vllms(
    b: dict[str, Any], prefill: bool, sizes: tuple[int, ...]
) -> None:
    """add_shrink then add_expand, as vLLM's fully sharded layers call them (through _apply_shrink and
    _apply_expand, the prefill and decode forms alike)."""
    tokens = b["tokens"]
    stock_wrapper, grouped = wrappers(tokens, tokens, prefill, b["slots"])
    x, lora_a, lora_b, start = layer(b, sizes)
    results = []
    for wrapper in (stock_wrapper, grouped):
        buffers = torch.zeros(len(sizes), len(tokens), b["rank"])
        wrapper.add_shrink(buffers, x, lora_a, 1.0)
        y = start.clone()
        wrapper.add_expand(y, buffers, lora_b, sizes, offset_start=0, add_inputs=True)
        results.append((buffers, y))
    (their_buffers, theirs), (our_buffers, ours) = results
    indices = torch.tensor(tokens)
    shrunk = [magnitude(x, a, indices) for a in lora_a]
    for i in range(len(sizes)):
        close(our_buffers[i], their_buffers[i], shrunk[i], b["hidden"])
    mag = torch.cat([magnitude(m, bw, indices) for m, bw in zip(shrunk, lora_b, strict=True)], dim=1)
    close(ours, theirs, mag * 1.01, b["rank"] + b["hidden"])
