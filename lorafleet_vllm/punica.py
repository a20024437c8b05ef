"""vLLM's CPU punica wrapper with the grouped ops (``lorafleet_vllm.ops``): the rows each adapter slot owns are
worked out once per step, where vLLM updates its LoRA metadata, and every LoRA layer of the step reuses them."""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from lorafleet_vllm import log, ops

# A batch of at most this many rows (decode steps: a row per request) that uses more than one adapter takes the
# one-matmul forms (ops.decode_*, packed_linear's batched branch); a larger one (a prefill chunk's rows, in runs
# of one adapter) a matmul per slot. vLLM's V1 runner marks every step as prefill (its LoRAMapping is_prefill),
# so the choice goes by the rows, not by that flag (measured: benchmarks/lora_ops.py).
BATCHED_ROWS = 64


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` whose shrink and expand run one matmul per adapter slot present."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rows: ops.Rows | None = None
        self._sampler_rows: ops.Rows | None = None
        self._weights = ops.Weights()
        self._onednn = ops.onednn_available()

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, *args, **kwargs)
        self._rows = ops.Rows.of_tokens(self.token_lora_indices)
        self._sampler_rows = ops.Rows.of_tokens(self.sampler_indices)

    def _rows_for(self, x: torch.Tensor, y: torch.Tensor, rows: ops.Rows | None) -> ops.Rows | None:
        """The step's rows when they describe ``x`` and ``y`` (else ``None``: vLLM's own op runs)."""
        if rows is None or x.shape[0] != rows.tokens or y.shape[0] != rows.tokens:
            return None
        return rows

    @staticmethod
    def _batched(rows: ops.Rows, slots: int) -> bool:
        """The one-matmul forms multiply by every slot, empty ones included: worth it while the adapters present
        are at least half the slots."""
        return rows.tokens <= BATCHED_ROWS and rows.adapters > 1 and 2 * rows.adapters >= slots

    def _shrink(
        self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: float, rows: ops.Rows, every: Any = None
    ) -> None:
        if self._batched(rows, w.shape[0]):
            every = self._weights.every_a((w,)) if every is None else every
            ops.decode_shrink(x, w, y, rows, scale, every)
        else:
            ops.shrink(x, w, y, rows, scale)

    def _expand(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w: torch.Tensor,
        offset: int,
        size: int | None,
        add: bool,
        rows: ops.Rows,
        every: Any = None,
    ) -> None:
        if self._batched(rows, w.shape[0]):
            every = self._weights.every_b((w,), ()) if every is None else every
            ops.decode_expand(x, w, y, rows, offset, size, add, every)
        else:
            ops.expand(x, w, y, rows, offset, size, add)

    def _step_rows(self, x: torch.Tensor, y: torch.Tensor) -> ops.Rows | None:
        """The step's rows for ``x`` and ``y``; ``None`` where vLLM's own op runs: rows the step's metadata does
        not describe, or a prefill step without LoRA (which vLLM's ``sgmv`` forms skip)."""
        if self.is_prefill and self.no_lora:
            return None
        return self._rows_for(x, y, self._rows)

    # vLLM's CPU wrapper sends every shrink and expand through these three, each choosing its prefill (sgmv) or
    # decode (bgmv) form; the grouped ops are one form for both.

    def _apply_shrink(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float) -> None:
        flat_y = y.view(-1, y.shape[-1])
        rows = self._step_rows(x, flat_y)
        if rows is None:
            return super()._apply_shrink(y, x, w_t_all, scale)
        self._shrink(flat_y, x, w_t_all, scale, rows)

    def _apply_expand(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        rows = self._step_rows(x, y)
        if rows is None:
            return super()._apply_expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs)
        self._expand(y, x, w_t_all, y_offset, y_slice_size, add_inputs, rows)

    def add_lora_embedding(
        self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor, add_inputs: bool = True, **kwargs: Any
    ) -> None:
        rows = self._step_rows(x, y)
        if rows is None:
            return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)
        self._expand(y, x, lora_b_stacked, 0, None, add_inputs, rows)

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """vLLM's per-slice shrinks and expands as one of each, over the layer's fused weights (``ops.Weights``)."""
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        rows = self._rows_for(flat_x, flat_y, self._rows)
        if rows is None or buffer is not None:
            return super().add_lora_linear(
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        if rows.single == ops.NO_ADAPTER:  # nothing to add (vLLM's prefill skips it too; its decode adds zeros)
            return None
        same_dtype = x.dtype == y.dtype == lora_a_stacked[0].dtype == lora_b_stacked[0].dtype
        packed = self._onednn and scale == 1.0 and same_dtype
        if packed and self._packed_linear(flat_y, flat_x, lora_a_stacked, lora_b_stacked, output_slices, rows):
            return None
        a, b = self._weights.linear(lora_a_stacked, lora_b_stacked, output_slices)
        every_a = every_b = None
        if self._batched(rows, lora_a_stacked[0].shape[0]):
            every_a = self._weights.every_a(lora_a_stacked)
            every_b = self._weights.every_b(lora_b_stacked, output_slices)
        shrunk = torch.empty((flat_x.size(0), a.size(-2)), dtype=torch.float32, device=x.device)
        self._shrink(shrunk, flat_x, a, scale, rows, every_a)
        self._expand(flat_y, shrunk, b, 0, sum(output_slices), True, rows, every_b)
        return None

    def _packed_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        sizes: tuple[int, ...],
        rows: ops.Rows,
    ) -> bool:
        """``add_lora_linear`` on vLLM's oneDNN matmul with packed weights: the shrink's result is rounded to the
        layer's dtype where vLLM's expand rounds it (``bgmv_expand``: ``inputs.to(output.dtype)``), each
        product once, as vLLM's are. ``False`` (``y`` untouched) when oneDNN will not take the weights: the
        plugin then uses ``torch.mm`` from there on, as vLLM's own layers fall back."""
        total = sum(sizes)
        try:
            if self._batched(rows, lora_a[0].shape[0]):  # x @ every slot's A, each row's own block kept, @ every B
                every_a, every_b = self._weights.packed_every(lora_a, lora_b, sizes)
                width = sum(t.shape[-2] for t in lora_a)  # the slices' ranks, fused
                mask = rows.mask(lora_a[0].shape[0], width, x.dtype)
                y[:, :total] += every_b(every_a(x).mul_(mask))
                return True
            packed = [(at, self._weights.packed(lora_a, lora_b, sizes, slot)) for slot, at in rows.groups if slot >= 0]
        except RuntimeError as exc:  # building a oneDNN handler failed; nothing was added to y yet
            log.warning("lorafleet LoRA ops: oneDNN matmul unavailable (%s); using torch.mm", exc)
            self._onednn = False
            return False
        for at, (a, b) in packed:
            y[at, :total] += b(a(x[at]))
        return True

    def add_lora_logits(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: float,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        rows = self._rows_for(flat_x, flat_y, self._sampler_rows)
        if rows is None:
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        if buffer is None:
            buffer = torch.zeros((flat_x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        self._shrink(buffer, flat_x, lora_a_stacked, scale, rows)
        self._expand(flat_y, buffer, lora_b_stacked, 0, None, True, rows)
