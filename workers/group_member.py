"""What attention and expert workers share: joining the group's process group."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch

from workers.group_spec import GroupSpec
from workers.transport import (
    ProcessGroupTransport,
    init_process_group,
    pick_free_port,
    pick_rendezvous_address,
)
from workers.worker_stats import WorkerStats


class GroupMember:
    kind = "member"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.rank = rank
        self.transport: ProcessGroupTransport | None = None
        self.dispatcher = None  # built in on_joined()
        self.busy_seconds = 0.0
        self.num_steps = 0

    def dispatch_stats(self) -> WorkerStats:
        """What this worker did since the last call (the counters restart)."""
        busy, self.busy_seconds = self.busy_seconds, 0.0
        steps, self.num_steps = self.num_steps, 0
        return WorkerStats(self.rank, self.kind, self.dispatcher.stats.snapshot_and_reset(), busy, steps)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 publishes where the group meets: this node's real address and a free port."""
        return pick_rendezvous_address(), pick_free_port()

    def join(self, master_addr: str, master_port: int) -> None:
        timeout = timedelta(seconds=self.spec.collective_timeout_s)
        self.transport = init_process_group(self.rank, self.spec.world_size, master_addr, master_port,
                                            self.spec.backend, timeout)
        self.on_joined()

    def on_joined(self) -> None:
        """Build what needs the transport (the dispatcher)."""

    def where(self) -> dict:
        """Where this worker runs: tests assert placement with it."""
        info = {"rank": self.rank, "pid": os.getpid(), "hostname": socket.gethostname(),
                "address": pick_rendezvous_address()}
        try:
            import ray  # only for the answer; the worker itself does not depend on Ray

            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                info["node_id"] = ctx.get_node_id()
        except ImportError:
            pass
        return info

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.destroy()
            self.transport = None
