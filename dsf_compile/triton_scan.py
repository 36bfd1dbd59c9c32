"""The DSF feedback recurrence ``δ = g + λ ⊙ δ_next`` as Triton kernels that Inductor schedules.

The recurrence is memory-bound: its floor is one read of ``g`` and one write of ``δ``.
``g`` is viewed as ``(T, C)`` with ``C`` = batch × state features (λ repeats every
``S`` columns).  A program owns a block of columns and walks time in tiles of
``BLOCK_T`` steps: a whole tile is loaded at once (many bytes in flight), scanned in
registers by ``tl.associative_scan`` over ``(decay, value)`` pairs, and linked to the
tile before it by the carried δ.  Accumulation is in λ's dtype (float32, or float64 for float64 inputs).

When the column blocks alone cannot fill the GPU (few columns, long T), time is also
split into segments run by separate programs: a first kernel writes each segment's
local result at its end (its "total"), the scan kernel folds the totals of the segments
before its own into the δ it starts from.  That costs one more read of ``g`` and keeps
every program busy.

``linear_scan`` is registered with ``torch.library.triton_op``: AOTAutograd decomposes
it into the kernel launches, so Inductor schedules them inside the backward graph
(no opaque fallback op; CUDA-graph safe).  Under ``TRITON_INTERPRET=1`` the kernels
themselves run on CPU tensors through :func:`launch_linear_scan`, which is how they are
tested without a GPU (the interpreter's kernels cannot be traced into graphs).

:func:`linear_recurrence` runs the same tiles with a decay that changes at every step
and a start value, in one kernel; :func:`varying_scan` is that kernel as an op, run
against time from zero: the time-varying diagonal recurrence of Highway-BP's backward
(DESIGN.md §7).  It reads one decay per element, so its floor is three tensors' traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def runs_on(device: torch.device) -> bool:
    """Whether :func:`linear_scan` can run on tensors of ``device``."""
    return triton is not None and device.type == "cuda"


@dataclass(frozen=True)
class ScanPlan:
    """How a scan is cut up: tile shape, warps, and the length of a time segment
    (a multiple of ``block_t``; ``segment >= T`` means one segment, a single kernel)."""

    block_t: int
    block_c: int
    num_warps: int
    segment: int


# Programs wanted per streaming multiprocessor before time is split into segments.
PROGRAMS_PER_SM = 4


def plan_scan(length: int, columns: int, device: torch.device) -> ScanPlan:
    """The default plan: 32×64 tiles; segments only when column blocks leave SMs idle,
    each at least 4 tiles long."""
    block_t, block_c = 32, 64
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    segments = max(1, min(_cdiv(PROGRAMS_PER_SM * sms, _cdiv(columns, block_c)), _cdiv(length, 4 * block_t)))
    return ScanPlan(block_t, block_c, 4, segment_length(length, segments, block_t))


def segment_length(length: int, segments: int, block_t: int) -> int:
    """Length of each of ``segments`` time segments covering ``length`` steps, in whole tiles."""
    return _cdiv(_cdiv(length, segments), block_t) * block_t


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if triton is not None:

    @triton.jit
    def _compose(decay_a, value_a, decay_b, value_b):
        # Pair (a, v) maps the δ carried into it to v + a·δ; b comes after a in scan order.
        return decay_a * decay_b, value_b + decay_b * value_a

    @triton.jit
    def _tile(first, tile, T, C, cols, col_ok, BACKWARDS: tl.constexpr, BLOCK_T: tl.constexpr):
        """Offsets and mask of the ``tile``-th block of BLOCK_T positions after ``first``
        in processing order (time runs down from T - 1 when ``BACKWARDS``)."""
        position = first + tile * BLOCK_T + tl.arange(0, BLOCK_T)
        if BACKWARDS:
            time = T - 1 - position
        else:
            time = position
        mask = (position < T)[:, None] & col_ok[None, :]
        return time[:, None].to(tl.int64) * C + cols[None, :], mask

    @triton.jit
    def _scan_tile(decay, values, carry, BLOCK_T: tl.constexpr):
        """Every state of a tile entered with ``carry``, and the last one (the next carry;
        only the very last tile can be partial, and its carry is not used)."""
        power, local = tl.associative_scan((decay, values), 0, _compose)
        states = local + power * carry[None, :]
        last = tl.sum(tl.where(tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1, states, 0.0), 0)
        return states, last

    @triton.jit
    def _scan_segment(g_ptr, out_ptr, lam, carry, first, T, C, TILES, cols, col_ok,
                      BACKWARDS: tl.constexpr, STORE: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        """Scan positions [first, first + TILES·BLOCK_T) ∩ [0, T) of the processing order,
        starting from ``carry``; returns the δ at the last of them."""
        decay = tl.broadcast_to(lam[None, :], (BLOCK_T, BLOCK_C))
        # a trip count fixed by the arguments (not by program ids) lets the compiler pipeline loads
        for tile in range(0, TILES):
            offsets, mask = _tile(first, tile, T, C, cols, col_ok, BACKWARDS, BLOCK_T)
            values = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(lam.dtype)
            delta, carry = _scan_tile(decay, values, carry, BLOCK_T)
            if STORE:
                tl.store(out_ptr + offsets, delta.to(out_ptr.dtype.element_ty), mask=mask)
        return carry

    @triton.jit
    def _linear_recurrence_kernel(decay_ptr, values_ptr, init_ptr, out_ptr, T, C, TILES,
                                  BACKWARDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        carry = tl.load(init_ptr + cols, mask=col_ok, other=0.0)
        for tile in range(0, TILES):
            offsets, mask = _tile(0, tile, T, C, cols, col_ok, BACKWARDS, BLOCK_T)
            decay = tl.load(decay_ptr + offsets, mask=mask, other=1.0).to(carry.dtype)
            values = tl.load(values_ptr + offsets, mask=mask, other=0.0).to(carry.dtype)
            states, carry = _scan_tile(decay, values, carry, BLOCK_T)
            tl.store(out_ptr + offsets, states.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _segment_totals_kernel(g_ptr, lam_ptr, totals_ptr, T, C, S, SEGMENT, TILES,
                               BACKWARDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        segment = tl.program_id(1)
        lam = tl.load(lam_ptr + cols % S, mask=col_ok, other=0.0)
        carry = lam * 0
        first = segment * SEGMENT
        carry = _scan_segment(g_ptr, g_ptr, lam, carry, first, T, C, TILES, cols, col_ok,
                              BACKWARDS, False, BLOCK_T, BLOCK_C)
        tl.store(totals_ptr + segment * C + cols, carry, mask=col_ok)

    @triton.jit
    def _linear_scan_kernel(g_ptr, lam_ptr, totals_ptr, out_ptr, T, C, S, SEGMENT, TILES, EARLIER,
                            BACKWARDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        segment = tl.program_id(1)
        lam = tl.load(lam_ptr + cols % S, mask=col_ok, other=0.0)
        # λ^SEGMENT links whole segments; λ = 0 must give 0, not exp2(-inf · 0)
        lam_segment = tl.where(lam > 0, tl.exp2(tl.log2(tl.maximum(lam, 1e-30)) * SEGMENT), 0.0)
        carry = lam * 0
        for before in range(0, EARLIER):
            total = tl.load(totals_ptr + before * C + cols, mask=col_ok, other=0.0)
            carry = tl.where(before < segment, total + lam_segment * carry, carry)
        first = segment * SEGMENT
        _scan_segment(g_ptr, out_ptr, lam, carry, first, T, C, TILES, cols, col_ok,
                      BACKWARDS, True, BLOCK_T, BLOCK_C)

    def launch_linear_scan(g: Tensor, lam: Tensor, backwards: bool, plan: ScanPlan | None = None) -> Tensor:
        """Run the kernels directly (no custom op): for tests and for tuning plans."""
        g = g.contiguous()
        length, columns = g.shape[0], g[0].numel()
        plan = plan or plan_scan(length, columns, g.device)
        return _launch(lambda kernel: kernel, g, lam, backwards, plan, length, columns)

    def _launch(wrap, g, lam, backwards, plan, length, columns):
        """Launch the kernels, each through ``wrap`` (``wrap_triton`` inside the op)."""
        out = torch.empty_like(g)
        lam = lam.contiguous()
        segments = _cdiv(length, plan.segment)
        tiles = plan.segment // plan.block_t
        grid = (_cdiv(columns, plan.block_c), segments)
        # the last segment's total is never read: totals of the first segments - 1 only
        totals = torch.empty((max(segments - 1, 1), columns), dtype=lam.dtype, device=g.device)
        meta = dict(BACKWARDS=backwards, BLOCK_T=plan.block_t, BLOCK_C=plan.block_c, num_warps=plan.num_warps)
        if segments > 1:
            wrap(_segment_totals_kernel)[(grid[0], segments - 1)](
                g, lam, totals, length, columns, lam.shape[0], plan.segment, tiles, **meta)
        wrap(_linear_scan_kernel)[grid](
            g, lam, totals, out, length, columns, lam.shape[0], plan.segment, tiles, segments - 1, **meta)
        return out

    def linear_recurrence(decay: Tensor, values: Tensor, init: Tensor) -> Tensor:
        """Every state of ``s_t = decay_t ⊙ s_{t-1} + values_t`` from ``s_0 = init``, over
        dim 0 of ``(T, ...)`` tensors (e.g. an LSTM's cell states given its gates): one
        kernel instead of T.  Values only, accumulated in float32 (float64 for float64)."""
        init = init.to(torch.promote_types(values.dtype, torch.float32))
        return _launch_recurrence(lambda kernel: kernel, decay, values, init, False)

    def _launch_recurrence(wrap, decay: Tensor, values: Tensor, init: Tensor, backwards: bool) -> Tensor:
        decay, values, init = decay.contiguous(), values.contiguous(), init.contiguous()
        length, columns = values.shape[0], values[0].numel()
        out = torch.empty_like(values)
        block_t, block_c = 32, 64
        wrap(_linear_recurrence_kernel)[(_cdiv(columns, block_c),)](
            decay, values, init, out, length, columns, _cdiv(length, block_t), BACKWARDS=backwards,
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
        return out

    def launch_varying_scan(g: Tensor, decay: Tensor, backwards: bool, wrap=lambda kernel: kernel) -> Tensor:
        """:func:`varying_scan`'s kernel launched directly (no custom op): for tests."""
        init = torch.zeros(g[0].numel(), dtype=decay.dtype, device=g.device)
        return _launch_recurrence(wrap, decay, g, init, backwards)

    @torch.library.triton_op("dsf::varying_scan_triton", mutates_args=())
    def varying_scan(g: Tensor, decay: Tensor, backwards: bool) -> Tensor:
        """``δ_t = g_t + decay_t ⊙ δ_{t+1}`` (``δ_{t-1}`` unless ``backwards``) from zero:
        ``dsf::reverse_linear_scan`` with a decay per step, by one Triton kernel."""
        return launch_varying_scan(g, decay, backwards, torch.library.wrap_triton)

    @torch.library.triton_op("dsf::linear_scan_triton", mutates_args=())
    def linear_scan(g: Tensor, lam: Tensor, backwards: bool) -> Tensor:
        """``dsf::reverse_linear_scan``'s recurrence by the Triton kernels (same signature)."""
        g = g.contiguous()
        # the plan depends on the sizes: a new size is a new graph, as with static shapes
        length, columns = int(g.shape[0]), int(g[0].numel())
        plan = plan_scan(length, columns, g.device)
        return _launch(torch.library.wrap_triton, g, lam, backwards, plan, length, columns)
