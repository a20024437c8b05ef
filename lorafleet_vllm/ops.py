"""LoRA shrink and expand for vLLM's CPU engine, grouped by adapter: one matmul per adapter present in a batch.

vLLM's CPU ops (``vllm/lora/ops/torch_ops/lora_ops.py``) gather a copy of the adapter weights for every
token (``weights[indices]``, then ``einsum("bi, boi -> bo")``), and the segmented prefill forms first
expand the per-sequence indices to per-token ones to do the same. These functions compute the same
products with one ``mm`` per adapter slot over that slot's rows (a view where the rows are contiguous, as a
sequence's tokens are), and for a decode batch that mixes adapters, one matmul against every slot's
weights at once (``decode_shrink``/``decode_expand``), which costs fewer operator calls than a loop.

Semantics are vLLM's, argument for argument: ``shrink`` writes ``scaling * x @ A[slot].T`` into
``output[:, :rank]``; ``expand`` writes or adds ``x @ B[slot].T`` into ``output[:, offset:offset + size]``;
products are computed in the output's dtype, as vLLM's are. A row whose slot is -1 has no adapter and gets
no LoRA contribution: ``shrink`` writes 0, ``expand`` adds nothing (or writes 0 when not adding). vLLM's
torch ops read slot -1 as Python does, the last slot, which holds zeros until an adapter is first loaded
there and that adapter's weights from then on (vLLM does not clear a slot when it unloads an adapter); the
no-adapter meaning is the one vLLM documents for the index (``PunicaWrapperBase.token_lora_indices``) and
its GPU kernels implement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

NO_ADAPTER = -1


@dataclass(frozen=True)
class Rows:
    """A batch's rows grouped by adapter slot: per slot, its rows (a slice where they are contiguous)."""

    groups: tuple[tuple[int, slice | torch.Tensor], ...]
    tokens: int
    slots: torch.Tensor  # one slot per row
    blocks: torch.Tensor  # for decode_shrink, one block per row: its slot + 1, 0 for no adapter
    _masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict, compare=False)

    @property
    def adapters(self) -> int:
        """How many adapter slots the rows use."""
        return sum(slot != NO_ADAPTER for slot, _ in self.groups)

    @property
    def single(self) -> int | None:
        """The slot every row uses, if they all use one."""
        return self.groups[0][0] if len(self.groups) == 1 else None

    @classmethod
    def of_tokens(cls, indices: torch.Tensor) -> Rows:
        """From one slot per row (vLLM's ``token_lora_indices`` or ``sampler_indices``)."""
        slots, counts = torch.unique_consecutive(indices, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        return cls.of_runs(slots.tolist(), starts.tolist(), counts.tolist(), indices)

    @classmethod
    def of_segments(cls, starts: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, batches: int) -> Rows:
        """From vLLM's prefill metadata: runs of rows that share a slot (``compute_meta``)."""
        starts, lengths, slots = starts[:batches], lengths[:batches], slots[:batches]
        return cls.of_runs(slots.tolist(), starts.tolist(), lengths.tolist(), torch.repeat_interleave(slots, lengths))

    @classmethod
    def of_runs(cls, slots: list[int], starts: list[int], lengths: list[int], per_row: torch.Tensor) -> Rows:
        runs: dict[int, list[tuple[int, int]]] = {}
        for slot, start, length in zip(slots, starts, lengths, strict=True):
            runs.setdefault(slot, []).append((start, start + length))
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for slot, spans in runs.items():
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                groups.append((slot, torch.cat([torch.arange(a, b) for a, b in spans])))
        return cls(tuple(groups), sum(lengths), per_row, per_row + 1)

    def mask(self, slots: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """``(rows, slots * width)``: ones over the block of each row's slot, zeros elsewhere (everywhere for a
        row without an adapter)."""
        key = (slots, width, dtype)
        if key not in self._masks:
            onehot = torch.nn.functional.one_hot(self.blocks, slots + 1)[:, 1:].to(dtype)
            self._masks[key] = onehot.repeat_interleave(width, dim=1)
        return self._masks[key]


def _stacked(weights: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked adapter weights, ``(slots, 1, out, in)`` or ``(slots, out, in)``, as ``(slots, out, in)``."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, rows: Rows, scaling: float) -> None:
    """``output[i, :rank] = scaling * inputs[i] @ weights[slot(i)].T`` for every row, grouped by slot."""
    stack = _stacked(weights)
    rank = stack.shape[1]
    x = inputs.to(output.dtype)
    for slot, at in rows.groups:
        if slot == NO_ADAPTER:
            output[at, :rank] = 0
        else:
            output[at, :rank] = torch.mm(x[at], stack[slot].to(output.dtype).t()).mul_(scaling)


def expand(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    rows: Rows,
    offset: int = 0,
    size: int | None = None,
    add_inputs: bool = True,
) -> None:
    """``output[i, offset:offset + size] (+)= inputs[i] @ weights[slot(i)].T`` for every row, grouped by slot.

    ``size`` ``None``: as vLLM's ``bgmv_expand``, the columns the weights and the output have in common.
    """
    stack = _stacked(weights)
    size = min(stack.shape[1], output.shape[1]) if size is None else size
    x = inputs.to(output.dtype)
    for slot, at in rows.groups:
        if slot == NO_ADAPTER:
            if not add_inputs:
                output[at, offset : offset + size] = 0
            continue
        _store(output, at, offset, size, torch.mm(x[at], stack[slot, :size].to(output.dtype).t()), add_inputs)


def _store(
    output: torch.Tensor, rows: slice | torch.Tensor, offset: int, size: int, product: torch.Tensor, add_inputs: bool
) -> None:
    """``output[rows, offset:offset + size] += product``, or ``=`` (vLLM's ``add_inputs``)."""
    columns = slice(offset, offset + size)
    if add_inputs:
        output[rows, columns] += product
    else:
        output[rows, columns] = product


def every_a(weights: torch.Tensor) -> torch.Tensor:
    """Shrink weights ``(slots, [1,] rank, in)`` as ``((slots + 1) * rank, in)``: a block of zeros (rows without
    an adapter), then every slot's, for ``decode_shrink``."""
    stack = _stacked(weights)
    return torch.cat([torch.zeros_like(stack[:1]), stack]).reshape(-1, stack.shape[2])


def every_b(weights: torch.Tensor) -> torch.Tensor:
    """Expand weights ``(slots, [1,] out, rank)`` as ``((slots + 1) * rank, out)``, zeros first, for
    ``decode_expand``."""
    stack = _stacked(weights)
    return torch.cat([torch.zeros_like(stack[:1]), stack]).transpose(1, 2).reshape(-1, stack.shape[1])


def decode_shrink(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    rows: Rows,
    scaling: float,
    every: torch.Tensor | None = None,
) -> None:
    """``shrink`` as one matmul against every slot's weights at once, then each row's own block picked: for a
    decode batch that mixes adapters, where a loop's operator calls cost more than the extra multiply-adds.

    ``every``: ``every_a(weights)``, built here when not given (``Weights`` keeps it between calls).
    """
    rank = _stacked(weights).shape[1]
    every = every_a(weights) if every is None else every
    products = torch.mm(inputs.to(output.dtype), every.to(output.dtype).t()).view(inputs.shape[0], -1, rank)
    picked = products.gather(1, rows.blocks.view(-1, 1, 1).expand(-1, 1, rank)).squeeze(1)
    output[:, :rank] = picked.mul_(scaling)


def decode_expand(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    rows: Rows,
    offset: int = 0,
    size: int | None = None,
    add_inputs: bool = True,
    every: torch.Tensor | None = None,
) -> None:
    """``expand`` as one matmul: each row's input placed in its own slot's block of a wide row (zeros in the
    others, and in all for a row without an adapter) times every slot's weights stacked along the rank: the
    weights are read once, as a loop over the slots would read them, in one operator call.

    ``every``: ``every_b(weights)``, built here when not given (``Weights`` keeps it between calls).
    """
    stack = _stacked(weights)
    slots, out_features, rank = stack.shape
    size = min(out_features, output.shape[1]) if size is None else size
    every = every_b(weights) if every is None else every
    spread = torch.zeros(inputs.shape[0], slots + 1, rank, dtype=output.dtype)
    spread[torch.arange(inputs.shape[0]), rows.blocks] = inputs.to(output.dtype)  # block 0: zero weights
    product = torch.mm(spread.view(inputs.shape[0], -1), every[:, :size].to(output.dtype))
    _store(output, slice(None), offset, size, product, add_inputs)


class Weights:
    """Forms of vLLM's stacked adapter weights built once and kept between steps, one set per layer.

    - ``linear``: vLLM fuses projections that share an input (q/k/v, gate/up) into one layer with a LoRA
      slice per projection, and its punica wrapper runs a shrink and an expand per slice. Fused here (the A
      matrices stacked along the rank, the B matrices block-diagonal), a layer's LoRA is one shrink and one
      expand whatever its slices, with the same products (the block-diagonal's zeros add nothing).
    - ``every_a``/``every_b``: the layouts of ``decode_shrink``/``decode_expand``.

    vLLM writes adapter weights into its stacked tensors in place when it loads or drops an adapter, and
    allocates them once per engine: each form is keyed by the tensors it comes from and rebuilt when one of
    their version counters has moved.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[object, ...], tuple[tuple[int, ...], Any]] = {}

    def _kept(self, kind: str, sources: tuple[torch.Tensor, ...], sizes: tuple[int, ...], build: Any) -> Any:
        key = (kind, sizes, *((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in sources))
        try:
            versions = tuple(t._version for t in sources)
        except RuntimeError:  # an inference-mode tensor keeps no version counter: nothing to key a copy on
            return build()
        kept = self._built.get(key)
        if kept is None or kept[0] != versions:
            kept = (versions, build())
            self._built[key] = kept
        return kept[1]

    def linear(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's slices as one: ``(slots, n * rank, in)`` in fp32 (the dtype of the punica wrapper's shrink
        buffers: converted once, not at every call) and ``(slots, sum(sizes), n * rank)``."""
        a = self._kept("a32", lora_a, (), lambda: self._fused_a(lora_a).float())
        return a, self._fused_b(lora_b, sizes)

    def every_a(self, lora_a: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """In fp32, the dtype of the punica wrapper's shrink buffers (converted once, not at every call)."""
        return self._kept("every_a", lora_a, (), lambda: every_a(self._fused_a(lora_a)).float())

    def every_b(self, lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        return self._kept("every_b", lora_b, sizes, lambda: every_b(self._fused_b(lora_b, sizes)))

    def packed(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...], slot: int
    ) -> tuple[Any, Any]:
        """One slot's fused A and B, each packed for vLLM's oneDNN matmul (``Packed``)."""
        a = self._kept(f"packed a {slot}", lora_a, (), lambda: Packed(_stacked(self._fused_a(lora_a))[slot]))
        b = self._kept(f"packed b {slot}", lora_b, sizes, lambda: Packed(_stacked(self._fused_b(lora_b, sizes))[slot]))
        return a, b

    def packed_every(
        self, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...]
    ) -> tuple[Any, Any]:
        """Every slot's fused weights one block after another, ``(slots * rank, in)`` and ``(slots * rank, out)``
        (no block of zeros: ``Rows.mask`` zeroes rows without an adapter), packed for vLLM's oneDNN matmul."""
        a = self._kept(
            "packed every a", lora_a, (), lambda: Packed(every_a(self._fused_a(lora_a))[self._skip(lora_a) :])
        )
        b = self._kept(
            "packed every b",
            lora_b,
            sizes,
            lambda: Packed(every_b(self._fused_b(lora_b, sizes))[self._skip(lora_a) :].t()),
        )
        return a, b

    @staticmethod
    def _skip(lora_a: tuple[torch.Tensor, ...]) -> int:
        """The rows of ``every_a``/``every_b``'s leading block of zeros: the fused rank."""
        return sum(t.shape[-2] for t in lora_a)

    def _fused_a(self, lora_a: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if len(lora_a) == 1:
            return lora_a[0]
        return self._kept("a", lora_a, (), lambda: torch.cat([_stacked(t) for t in lora_a], dim=1))

    def _fused_b(self, lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if len(lora_b) == 1:
            return lora_b[0]
        return self._kept("b", lora_b, sizes, lambda: _block_diagonal(lora_b, sizes))


class Packed:
    """``x @ weight.T`` by vLLM's own oneDNN matmul (``vllm._custom_ops.onednn_mm``, what its CPU linear
    layers run), the weight packed once: two to three times ``torch.mm``'s speed on LoRA's small matrices,
    with the same result (fp32 accumulation, one rounding to the input's dtype)."""

    def __init__(self, weight: torch.Tensor) -> None:
        from vllm import _custom_ops

        self._ops = _custom_ops
        self._weight = weight  # (out, in); held while the handler lives, whatever oneDNN keeps of it
        self._handler = _custom_ops.create_onednn_mm(weight.t(), 32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.onednn_mm(self._handler, x, None)


def onednn_available() -> bool:
    """Whether vLLM's oneDNN matmul is there, as vLLM's own CPU linear layers decide
    (``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``)."""
    from vllm import _custom_ops
    from vllm.platforms import CpuArchEnum, current_platform

    return bool(_custom_ops._supports_onednn) and current_platform.get_cpu_architecture() != CpuArchEnum.POWERPC


def _block_diagonal(lora_b: tuple[torch.Tensor, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    parts = [_stacked(t)[:, :size] for t, size in zip(lora_b, sizes, strict=True)]
    slots, rank = parts[0].shape[0], parts[0].shape[2]
    fused = torch.zeros(slots, sum(sizes), rank * len(parts), dtype=parts[0].dtype)
    row = 0
    for i, part in enumerate(parts):
        fused[:, row : row + part.shape[1], i * rank : (i + 1) * rank] = part
        row += part.shape[1]
    return fused
