"""The frozen record `dispatch()` hands to `combine()`.

Shapes: T tokens on this rank, N rows this rank sends (token × chosen expert),
M rows this rank receives for its local experts, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    num_tokens: int  # T: rows combine() must produce
    token_idx_N: torch.Tensor  # int64, source token of each sent row, rows grouped by destination
    weights_N: torch.Tensor  # fp32 routing weight of each sent row (0 where capacity dropped it)
    send_counts: tuple[int, ...]  # rows sent to each rank
    recv_counts: tuple[int, ...]  # rows received from each rank
    # int64 [E] on the rows' device: received rows per local expert, after regrouping. A tensor,
    # not a tuple, so that the local path never reads it back to the host.
    expert_counts_E: torch.Tensor
    recv_order_M: torch.Tensor | None = None  # regroups received rows by local expert; None: already grouped
    num_dropped: int = 0  # assignments over an expert's capacity (contribute zero)

    @property
    def num_sent(self) -> int:
        return sum(self.send_counts)

    @property
    def num_received(self) -> int:
        return sum(self.recv_counts)

    @property
    def recv_expert_counts(self) -> tuple[int, ...]:
        """`expert_counts_E` on the host, for statistics and tests (a device→host copy on a GPU)."""
        return tuple(self.expert_counts_E.tolist())
