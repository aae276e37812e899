"""The distributed dispatcher: dispatch and combine as all-to-alls over a model group.

Every rank runs every stage of every MoE layer, in lock step; a rank with no tokens (an
expert rank) dispatches 0 rows, a rank with no experts runs experts on 0 rows.

dispatch, on the sending side:
  1. Each of the T×K assignments picks a copy of its expert. A replicated expert's
     assignments on this rank are dealt round-robin over its copies in token order,
     starting at copy `rank mod copies`: (position among this rank's assignments to the
     expert + rank) mod copies. Every rank splits evenly, and ranks with a single decode
     token each still land on different copies.
  2. Optional capacity (capacity.py) drops assignments beyond the per-rank cap.
  3. Rows are sorted by destination (rank, local slot) – so by rank, and within a rank by
     the receiver's local expert – and counted into a [W, C] matrix, C = the most experts
     any rank holds in this layer.
  4. One all-to-all of the count matrix tells every receiver how many rows each source
     sends to each of its local experts; a second one moves the rows.
On the receiving side, rows arrive source-major, slot-minor; `recv_order_M` regroups them
slot-major so each local expert's rows are contiguous for `grouped_experts`.
combine undoes the regrouping, sends every row back with the counts swapped (no counts
exchange: dispatch already knows them) and sums each token's rows with its routing weights.

That is the exact path, for prefill and large steps. A step may instead be low-latency
(`begin_step(tokens)`, chosen by the engine for small decode steps): the same assignments,
then fixed-capacity buffers with the counts in-band, one all-to-all each way and no host
read (low_latency_dispatch.py).

Shapes: T tokens on this rank, K top-k, A = T·K assignments, N rows sent, M rows received,
H hidden, E experts per layer, W world size, C max local experts per rank.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from workers.comm.transport import Transfer, Transport
from workers.moe.capacity import expert_capacity, position_in_expert
from workers.moe.combine import weighted_sum
from workers.moe.dispatch_plan import DispatchPlan
from workers.moe.expert_map import ExpertMap
from workers.moe.low_latency_dispatch import LowLatencyAllToAll, LowLatencyPlan
from workers.moe.route import Routing, count_per_expert


@dataclass(frozen=True)
class DispatchStatsSnapshot:
    """What one rank's dispatcher saw since the last snapshot (bytes include rows a rank sends itself)."""

    tokens_per_expert: dict[tuple[int, int], int]  # (layer, expert) → rows this rank's copy received
    num_dispatches: int
    num_dropped: int  # assignments this rank dropped for capacity
    dispatch_seconds: float
    combine_seconds: float
    dispatch_bytes_sent: int
    dispatch_bytes_received: int
    combine_bytes_sent: int
    combine_bytes_received: int


class DispatchStats:
    """A mutable accumulator the dispatcher writes to and the metrics exporter drains."""

    def __init__(self) -> None:
        self._reset()

    def record_dispatch(self, layer: int, local_expert_ids: tuple[int, ...],
                        recv_expert_counts: tuple[int, ...], num_dropped: int, transfer: Transfer,
                        seconds: float) -> None:
        for e, n in zip(local_expert_ids, recv_expert_counts, strict=True):
            self._tokens[(layer, e)] = self._tokens.get((layer, e), 0) + n
        self._num_dispatches += 1
        self._num_dropped += num_dropped
        self._dispatch += transfer
        self._dispatch_seconds += seconds

    def record_dispatch_on_device(self, layer: int, local_expert_ids: tuple[int, ...],
                                  expert_counts_E: torch.Tensor, transfer: Transfer, seconds: float) -> None:
        """As record_dispatch, with the counts left on the device: they are summed there and read
        once per snapshot, so a low-latency step never waits for them."""
        if local_expert_ids:
            key = (layer, local_expert_ids)
            held = self._device_tokens.get(key)
            self._device_tokens[key] = expert_counts_E.clone() if held is None else held + expert_counts_E
        self._num_dispatches += 1
        self._dispatch += transfer
        self._dispatch_seconds += seconds

    def record_combine(self, transfer: Transfer, seconds: float) -> None:
        self._combine += transfer
        self._combine_seconds += seconds

    def add_counted_elsewhere(self, tokens: dict[tuple[int, int], int], num_dispatches: int,
                              dispatch: Transfer, combine: Transfer) -> None:
        """Add what no dispatch call recorded (a CUDA graph's replays count on the device:
        workers/group/replay_stats.py); their seconds are not known stage by stage."""
        for key, n in tokens.items():
            self._tokens[key] = self._tokens.get(key, 0) + n
        self._num_dispatches += num_dispatches
        self._dispatch += dispatch
        self._combine += combine

    def snapshot_and_reset(self) -> DispatchStatsSnapshot:
        for (layer, expert_ids), counts_E in self._device_tokens.items():
            for e, n in zip(expert_ids, counts_E.tolist(), strict=True):
                self._tokens[(layer, e)] = self._tokens.get((layer, e), 0) + n
        snap = DispatchStatsSnapshot(
            tokens_per_expert=dict(self._tokens), num_dispatches=self._num_dispatches,
            num_dropped=self._num_dropped,
            dispatch_seconds=self._dispatch_seconds, combine_seconds=self._combine_seconds,
            dispatch_bytes_sent=self._dispatch.bytes_sent,
            dispatch_bytes_received=self._dispatch.bytes_received,
            combine_bytes_sent=self._combine.bytes_sent,
            combine_bytes_received=self._combine.bytes_received,
        )
        self._reset()
        return snap

    def _reset(self) -> None:
        self._tokens: dict[tuple[int, int], int] = {}
        self._device_tokens: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self._num_dispatches = 0
        self._num_dropped = 0
        self._dispatch = Transfer()
        self._combine = Transfer()
        self._dispatch_seconds = 0.0
        self._combine_seconds = 0.0


@dataclass(frozen=True)
class _LayerTable:
    """One layer's expert map as tensors on the transport's device."""

    num_copies_E: torch.Tensor  # int64 [E]
    dest_ER: torch.Tensor  # int64 [E, max copies]: rank·C + slot of each copy (-1 past the last)
    max_local_experts: int  # C


def _layer_table(expert_map: ExpertMap, layer: int, device: torch.device) -> _LayerTable:
    c = expert_map.max_local_experts(layer)
    copies = [expert_map.replicas(layer, e) for e in range(expert_map.num_experts)]
    max_copies = max(len(r) for r in copies)
    dest = [[rank * c + slot for rank, slot in r] + [-1] * (max_copies - len(r)) for r in copies]
    return _LayerTable(
        num_copies_E=torch.tensor([len(r) for r in copies], dtype=torch.int64, device=device),
        dest_ER=torch.tensor(dest, dtype=torch.int64, device=device),
        max_local_experts=c,
    )


class AllToAllDispatcher:
    """This rank's side of every layer's dispatch and combine. It moves rows only: the experts
    this rank holds are run by the MoE block (moe.py) on what dispatch delivers."""

    def __init__(self, rank: int, expert_map: ExpertMap, transport: Transport,
                 capacity_factor: float | None = None) -> None:
        if transport.rank != rank or transport.world_size != expert_map.world_size:
            raise ValueError(f"transport is rank {transport.rank} of {transport.world_size}; "
                             f"expected rank {rank} of {expert_map.world_size}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        self.rank = rank
        self.expert_map = expert_map
        self.transport = transport
        self.capacity_factor = capacity_factor
        self.stats = DispatchStats()
        self._tables = [_layer_table(expert_map, layer, transport.device)
                        for layer in range(expert_map.num_layers)]
        self._low_latency = LowLatencyAllToAll(rank, expert_map, transport)
        self._low_latency_tokens: int | None = None  # per step: begin_step
        self._sent_T: torch.Tensor | None = None  # within padding(): which tokens' rows are sent

    def begin_step(self, low_latency_tokens: int | None) -> None:
        """How this step's layers dispatch: exact (None), or low-latency with buffers sized for
        `low_latency_tokens` tokens per source rank (the same number on every rank)."""
        if low_latency_tokens is not None:
            if self.capacity_factor is not None:
                raise ValueError("low-latency dispatch is dropless: it does not apply a capacity factor")
            if low_latency_tokens < 1:
                raise ValueError(f"low_latency_tokens must be >= 1, got {low_latency_tokens}")
        self._low_latency_tokens = low_latency_tokens

    @contextlib.contextmanager
    def padding(self, sent_T: torch.Tensor) -> Iterator[None]:
        """Within: low-latency dispatches send only the rows of the tokens `sent_T` (bool [T], on
        the device) marks. A CUDA graph replays a bucket of B rows for S ≤ B sequences; the padding
        rows must not reach the experts (computed for nothing, and counted as load the expert
        plane would rebalance on). The mask is computed by the graph from its static inputs, so
        each replay reads its own step's."""
        self._sent_T = sent_T
        try:
            yield
        finally:
            self._sent_T = None

    def dispatch(self, layer: int, x_TH: torch.Tensor,
                 routing: Routing) -> tuple[torch.Tensor, DispatchPlan | LowLatencyPlan]:
        sent_T = self._sent_T
        if sent_T is not None and self._low_latency_tokens is None:
            raise RuntimeError("padding rows can be left unsent by low-latency dispatch only")
        if sent_T is not None and sent_T.shape != (x_TH.shape[0],):
            raise ValueError(f"a mask of {tuple(sent_T.shape)} for {x_TH.shape[0]} tokens")
        if self._low_latency_tokens is not None:
            start = time.perf_counter()
            dest_A, token_A, weight_A, _ = self._assign(layer, routing)
            x_MH, plan, moved = self._low_latency.dispatch(
                layer, x_TH, dest_A, token_A, weight_A, self._low_latency_tokens, routing.top_k,
                sent_A=None if sent_T is None else sent_T[token_A])
            self.stats.record_dispatch_on_device(layer, self.expert_map.local_experts(layer, self.rank),
                                                 plan.expert_counts_E, moved, time.perf_counter() - start)
            return x_MH, plan
        return self._dispatch_exact(layer, x_TH, routing)

    def _assign(self, layer: int, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Steps 1–2: each assignment's destination rank·C + slot, its token, its weight; and the
        number dropped for capacity."""
        table = self._tables[layer]
        num_experts = self.expert_map.num_experts
        num_tokens, top_k = routing.num_tokens, routing.top_k
        expert_A = routing.topk_ids_TK.reshape(-1)
        weight_A = routing.topk_weights_TK.reshape(-1)
        token_A = torch.arange(num_tokens * top_k, device=expert_A.device) // top_k
        pos_A = position_in_expert(expert_A, num_experts)
        num_dropped = 0
        if self.capacity_factor is not None:
            keep_A = pos_A < expert_capacity(num_tokens, top_k, num_experts, self.capacity_factor)
            num_dropped = int(keep_A.numel() - keep_A.sum())
            expert_A, weight_A = expert_A[keep_A], weight_A[keep_A]
            token_A, pos_A = token_A[keep_A], pos_A[keep_A]
        copy_A = (pos_A + self.rank) % table.num_copies_E[expert_A]
        return table.dest_ER[expert_A, copy_A], token_A, weight_A, num_dropped

    def _dispatch_exact(self, layer: int, x_TH: torch.Tensor,
                        routing: Routing) -> tuple[torch.Tensor, DispatchPlan]:
        start = time.perf_counter()
        table, world = self._tables[layer], self.expert_map.world_size
        c = table.max_local_experts
        num_tokens = routing.num_tokens
        dest_A, token_A, weight_A, num_dropped = self._assign(layer, routing)
        order_N = torch.argsort(dest_A, stable=True)
        token_idx_N = token_A[order_N]
        send_WC = count_per_expert(dest_A, world * c).view(world, c)  # by (rank, slot), no sync

        recv_WC = self.transport.exchange_counts(send_WC)
        moved = self.transport.last_transfer
        # The split sizes must be on the host: one read of both count matrices, the step's only
        # wait for the device in this layer's dispatch.
        both = torch.cat([send_WC.to(recv_WC.device), recv_WC]).tolist()
        send_counts = tuple(sum(row) for row in both[:world])
        recv_list = both[world:]
        recv_counts = tuple(sum(row) for row in recv_list)
        x_MH = self.transport.all_to_all_with_counts(x_TH[token_idx_N], send_counts, recv_counts)
        moved = moved + self.transport.last_transfer

        local_ids = self.expert_map.local_experts(layer, self.rank)
        per_slot = [sum(col) for col in zip(*recv_list, strict=True)]
        if any(per_slot[len(local_ids):]):
            raise RuntimeError(f"layer {layer}: rank {self.rank} received rows for slots it does not have: "
                               f"{per_slot}")
        recv_order_M = None
        if sum(1 for n in recv_counts if n) > 1:  # rows from one source at most are already grouped
            slot_M = torch.repeat_interleave(torch.arange(c, device=recv_WC.device).repeat(world),
                                             recv_WC.reshape(-1))
            recv_order_M = torch.argsort(slot_M, stable=True).to(x_MH.device)
            x_MH = x_MH[recv_order_M]
        recv_expert_counts = tuple(per_slot[:len(local_ids)])
        plan = DispatchPlan(
            num_tokens=num_tokens, token_idx_N=token_idx_N, weights_N=weight_A[order_N],
            send_counts=send_counts, recv_counts=recv_counts,
            expert_counts_E=torch.tensor(recv_expert_counts, dtype=torch.int64, device=x_MH.device),
            recv_order_M=recv_order_M, num_dropped=num_dropped,
        )
        self.stats.record_dispatch(layer, local_ids, recv_expert_counts, num_dropped, moved,
                                   time.perf_counter() - start)
        return x_MH, plan

    def combine(self, layer: int, y_MH: torch.Tensor, plan: DispatchPlan | LowLatencyPlan) -> torch.Tensor:
        if isinstance(plan, LowLatencyPlan):
            start = time.perf_counter()
            out_TH, moved = self._low_latency.combine(layer, y_MH, plan)
            self.stats.record_combine(moved, time.perf_counter() - start)
            return out_TH
        start = time.perf_counter()
        if plan.recv_order_M is not None:
            y_MH = torch.empty_like(y_MH).index_copy_(0, plan.recv_order_M, y_MH)
        y_NH = self.transport.all_to_all_with_counts(y_MH, plan.recv_counts, plan.send_counts)
        moved = self.transport.last_transfer
        out_TH = weighted_sum(y_NH, plan, y_NH.dtype)
        self.stats.record_combine(moved, time.perf_counter() - start)
        return out_TH
