"""Low-latency dispatch and combine: fixed-capacity buffers, counts in-band, one all-to-all each way.

The exact path (a2a_dispatcher.py) exchanges a count matrix, reads it on the host to size the
row all-to-all, then moves the rows: two collectives and a host round trip per layer. For a
decode step that wait is most of the layer. Here every buffer has a size all ranks know
without asking (DeepEP's low-latency mode has the same idea):

    capacity  = tokens × min(K, C)   rows one source can send one destination, at most: a
                                     token's K experts are distinct, and a destination holds C
                                     of a layer's experts at most; `tokens` is the step's
                                     largest count of tokens on one rank, sent with the step
    segment   = [C int64 counts][capacity rows]     one per (source, destination), as bytes

Sources are the ranks that own tokens (the attention ranks; every rank where there are none,
as in single-rank tests), destinations the ranks holding experts of the layer. Which rank
sends how many segments to which is fixed by the expert map, so the split sizes are known
statically: dispatch is one all-to-all of segments, combine one of padded rows back, and no
count ever visits the host. Nothing is dropped (the capacity is a worst case), so the results
equal the exact path's.

A decode step padded to a CUDA graph's batch size has padding rows the receivers must not see
(they would be computed for nothing and counted as load): `sent_A` marks the assignments to
send, and the others go to a last, "nowhere" segment that is never sent, counted or read back.

A receiver's rows arrive source-major, each source's rows grouped by local slot then padding;
a sort by slot (padding last) makes each local expert's rows contiguous for the experts stage,
which reads the in-band counts as a device tensor. combine scatters the outputs back into the
padded layout and returns them; each source gathers its rows by where it put them.

Shapes: A assignments (T·K) on this rank, N rows it sends (= A), S sources, X destinations,
P capacity rows per segment, C max local experts per rank, H hidden, W world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.comm.transport import Transfer, Transport
from workers.moe.combine import weighted_sum
from workers.moe.expert_map import ExpertMap
from workers.moe.route import count_per_expert

_COUNT_BYTES = 8  # int64 counts in each segment's header


@dataclass(frozen=True)
class LowLatencyPlan:
    """What a low-latency dispatch hands to its combine (the exact path's DispatchPlan analogue)."""

    num_tokens: int  # T: rows combine() produces on this rank
    token_idx_N: torch.Tensor  # int64, source token of each sent row (sorted by destination)
    weights_N: torch.Tensor  # fp32 routing weight of each sent row
    return_index_N: torch.Tensor  # int64, each sent row's place in the buffer combine receives [X·P]
    capacity: int  # P
    # Receiving side: real rows per local expert (int64 [E_local], on the device, never read on
    # the host here), and the slot-major order of the padded rows received [S·P].
    expert_counts_E: torch.Tensor
    recv_order_M: torch.Tensor | None
    num_dropped: int = 0  # always 0: the capacity is a worst case
    sent_N: torch.Tensor | None = None  # bool, which sent rows went anywhere; None: all of them


@dataclass(frozen=True)
class _LayerRoles:
    """Who sends to whom in one layer: fixed by the expert map."""

    sources: tuple[int, ...]
    destinations: tuple[int, ...]
    max_local_experts: int  # C
    # int64 [W + 1]: a rank's index among the destinations (-1: not one); the last entry, for
    # rank·C + slot = W·C ("nowhere"), is X: the segment of rows not sent.
    dest_index_W: torch.Tensor
    destinations_X: torch.Tensor  # int64 [X], on the device (indexing by a list would copy one there)


class LowLatencyAllToAll:
    """One rank's side of the fixed-capacity dispatch and combine, over any transport."""

    def __init__(self, rank: int, expert_map: ExpertMap, transport: Transport) -> None:
        self.rank = rank
        self.expert_map = expert_map
        self.transport = transport
        self._roles = [self._layer_roles(layer) for layer in range(expert_map.num_layers)]

    def _layer_roles(self, layer: int) -> _LayerRoles:
        emap = self.expert_map
        destinations = tuple(r for r in range(emap.world_size) if emap.local_experts(layer, r))
        sources = emap.attention_ranks or tuple(range(emap.world_size))
        index = [-1] * emap.world_size + [len(destinations)]
        for i, r in enumerate(destinations):
            index[r] = i
        device = self.transport.device
        return _LayerRoles(sources, destinations, emap.max_local_experts(layer),
                           torch.tensor(index, dtype=torch.int64, device=device),
                           torch.tensor(destinations, dtype=torch.int64, device=device))

    @staticmethod
    def capacity(max_tokens: int, top_k: int, max_local_experts: int) -> int:
        return max_tokens * min(top_k, max_local_experts)

    def dispatch(self, layer: int, x_TH: torch.Tensor, dest_A: torch.Tensor, token_A: torch.Tensor,
                 weight_A: torch.Tensor, max_tokens: int, top_k: int,
                 sent_A: torch.Tensor | None = None) -> tuple[torch.Tensor, LowLatencyPlan, Transfer]:
        """`dest_A` (rank·C + slot of each assignment) as the exact path computes it. `sent_A`
        (bool): the assignments to send; None sends all (padding rows are the others)."""
        roles, world = self._roles[layer], self.expert_map.world_size
        c, hidden = roles.max_local_experts, x_TH.shape[1]
        num_tokens = x_TH.shape[0]
        if num_tokens > max_tokens:
            raise ValueError(f"layer {layer}: rank {self.rank} has {num_tokens} tokens, the step's "
                             f"low-latency buffers hold {max_tokens}")
        is_source, is_destination = self.rank in roles.sources, self.rank in roles.destinations
        if num_tokens and not is_source:
            raise RuntimeError(f"layer {layer}: rank {self.rank} has tokens but is not a source rank")
        cap = self.capacity(max_tokens, top_k, c)
        row_bytes = hidden * x_TH.element_size()
        seg_bytes = _COUNT_BYTES * c + cap * row_bytes

        nowhere = world * c
        if sent_A is not None:  # sorted last, into the segment past the destinations
            dest_A = torch.where(sent_A, dest_A, nowhere)
        order_N = torch.argsort(dest_A, stable=True)
        dest_N, token_idx_N, weights_N = dest_A[order_N], token_A[order_N], weight_A[order_N]
        dx_N = roles.dest_index_W[dest_N // c]  # destination index of each row
        # Position of each row inside its destination's segment: rows are sorted by destination,
        # so it is the row's index minus the index of its destination's first row.
        pos_N = torch.arange(dest_N.numel(), device=dest_N.device) - torch.searchsorted(dx_N, dx_N)

        num_dest = len(roles.destinations)
        sent_N = None if sent_A is None else dest_N != nowhere
        if is_source:
            counts_XC = count_per_expert(dest_N, nowhere + 1)[:nowhere].view(world, c).index_select(
                0, roles.destinations_X)
            # One segment more than sent: where rows sent nowhere land (clamped: there may be
            # more of them than a segment holds; they overwrite each other, unread).
            rows_XPH = x_TH.new_zeros(num_dest + 1, cap, hidden)
            rows_XPH[dx_N, pos_N.clamp(max=cap - 1)] = x_TH[token_idx_N]
            rows_bytes = rows_XPH[:num_dest].view(torch.uint8).reshape(num_dest, cap * row_bytes)
            send = torch.cat([counts_XC.contiguous().view(torch.uint8), rows_bytes], dim=1)
        else:
            send = x_TH.new_empty(0, seg_bytes, dtype=torch.uint8)
        send_splits = [int(is_source and r in roles.destinations) for r in range(world)]
        recv_splits = [int(is_destination and r in roles.sources) for r in range(world)]
        recv = self.transport.all_to_all_with_counts(send, send_splits, recv_splits)
        moved = self.transport.last_transfer

        num_local = len(self.expert_map.local_experts(layer, self.rank))
        if is_destination:
            num_src = len(roles.sources)
            counts_SC = recv[:, :_COUNT_BYTES * c].contiguous().view(torch.int64)
            rows_MH = recv[:, _COUNT_BYTES * c:].contiguous().view(x_TH.dtype).view(num_src * cap, hidden)
            # Slot of each received row (C for padding), then rows in slot-major order.
            pos_SP = torch.arange(cap, device=recv.device).expand(num_src, cap).contiguous()
            slot_SP = torch.searchsorted(counts_SC.cumsum(1), pos_SP, right=True)
            recv_order_M = torch.argsort(slot_SP.reshape(-1), stable=True)
            x_MH = rows_MH[recv_order_M]
            expert_counts_E = counts_SC.sum(0)[:num_local]
        else:
            x_MH = x_TH.new_empty(0, hidden)
            recv_order_M = None
            expert_counts_E = torch.zeros(num_local, dtype=torch.int64, device=x_TH.device)
        return_index_N = dx_N * cap + pos_N
        if sent_N is not None:  # rows sent nowhere read row 0 back, and combine zeroes them
            return_index_N = torch.where(sent_N, return_index_N, 0)
        plan = LowLatencyPlan(
            num_tokens=num_tokens, token_idx_N=token_idx_N, weights_N=weights_N,
            return_index_N=return_index_N, capacity=cap, expert_counts_E=expert_counts_E,
            recv_order_M=recv_order_M, sent_N=sent_N)
        return x_MH, plan, moved

    def combine(self, layer: int, y_MH: torch.Tensor, plan: LowLatencyPlan) -> tuple[torch.Tensor, Transfer]:
        roles, world = self._roles[layer], self.expert_map.world_size
        is_source, is_destination = self.rank in roles.sources, self.rank in roles.destinations
        cap, hidden = plan.capacity, y_MH.shape[1]
        if is_destination:
            # Back into the padded, source-major layout the rows came in (padding rows carry
            # whatever the experts stage left there: nobody reads them).
            y_MH = torch.empty_like(y_MH).index_copy_(0, plan.recv_order_M, y_MH)
            send = y_MH.view(len(roles.sources), cap * hidden)
        else:
            send = y_MH.new_empty(0, cap * hidden)
        send_splits = [int(is_destination and r in roles.sources) for r in range(world)]
        recv_splits = [int(is_source and r in roles.destinations) for r in range(world)]
        recv = self.transport.all_to_all_with_counts(send, send_splits, recv_splits)
        moved = self.transport.last_transfer
        y_NH = recv.view(-1, hidden)[plan.return_index_N]
        if plan.sent_N is not None:  # `where`, not a product: the row read back may be any value
            y_NH = torch.where(plan.sent_N[:, None], y_NH, y_NH.new_zeros(()))
        return weighted_sum(y_NH, plan, y_MH.dtype), moved
