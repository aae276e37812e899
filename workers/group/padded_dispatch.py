"""The attention worker's dispatcher, which can leave a padded decode step's padding rows unsent.

A CUDA graph replays a fixed number of rows, so a step of S sequences runs in a bucket of B ≥ S
rows, the last B − S padding (workers/model/cuda_graph_inputs.py). The padding rows go through
every layer like real ones; what they would dispatch must not: the expert workers would compute
it for nothing and count it as load, and the expert plane rebalances on those counts. Within
`padding(sent_T)`, a low-latency dispatch sends only the rows `sent_T` marks
(workers/moe/low_latency_dispatch.py puts the others in a segment that is never sent). The mask is
a device tensor the graph computes from its static inputs, so a replay reads each step's own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from workers.moe.a2a_dispatcher import AllToAllDispatcher
from workers.moe.dispatch_plan import DispatchPlan
from workers.moe.low_latency_dispatch import LowLatencyPlan
from workers.moe.route import Routing


class PaddedStepDispatcher(AllToAllDispatcher):
    _sent_T: torch.Tensor | None = None

    @contextlib.contextmanager
    def padding(self, sent_T: torch.Tensor) -> Iterator[None]:
        """Within: low-latency dispatches send the rows of the tokens `sent_T` (bool [T]) marks."""
        self._sent_T = sent_T
        try:
            yield
        finally:
            self._sent_T = None

    def dispatch(self, layer: int, x_TH: torch.Tensor,
                 routing: Routing) -> tuple[torch.Tensor, DispatchPlan | LowLatencyPlan]:
        if self._sent_T is None:
            return super().dispatch(layer, x_TH, routing)
        if self._low_latency_tokens is None:
            raise RuntimeError("padding rows can be left unsent by low-latency dispatch only")
        if self._sent_T.shape != (x_TH.shape[0],):
            raise ValueError(f"a mask of {tuple(self._sent_T.shape)} for {x_TH.shape[0]} tokens")
        start = time.perf_counter()
        dest_A, token_A, weight_A, _ = self._assign(layer, routing)
        x_MH, plan, moved = self._low_latency.dispatch(layer, x_TH, dest_A, token_A, weight_A,
                                                       self._low_latency_tokens, routing.top_k,
                                                       sent_A=self._sent_T[token_A])
        self.stats.record_dispatch_on_device(layer, self.expert_map.local_experts(layer, self.rank),
                                             plan.expert_counts_E, moved, time.perf_counter() - start)
        return x_MH, plan
