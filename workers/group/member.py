"""What attention and expert workers share: the one device decision, the checkpoint, joining
the group's process group, the step loop that the engine feeds without a Ray call per step, and
following the group's expert placement as it changes (placement_update.py)."""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from datetime import timedelta

import torch

from workers.comm.collective_backend import RankDevice
from workers.comm.transport import (
    ProcessGroupTransport,
    init_process_group,
    pick_free_port,
    pick_rendezvous_address,
)
from workers.device.memory import ensure_weights_fit
from workers.device.selection import resolve_dtype, select_device
from workers.group.low_priority import run_at_low_priority
from workers.group.placement_update import PlacementUpdate
from workers.group.spec import GroupSpec
from workers.group.step_link import StepLink
from workers.group.step_loop import serve_steps
from workers.group.step_message import StepMessage, StepRoute
from workers.group.worker_stats import WorkerStats
from workers.weights.checkpoint import Checkpoint


class GroupMember:
    kind = "member"

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.rank = rank
        self.device = select_device(spec.device)  # once, here; everything below is built on it
        self.checkpoint = Checkpoint.open(spec.model_dir)
        self.config = self.checkpoint.config
        self.dtype = resolve_dtype(spec.dtype, self.device, self.config.torch_dtype)
        self.transport: ProcessGroupTransport | None = None
        self.dispatcher = None  # built in on_joined()
        self.busy_seconds = 0.0
        self.num_steps = 0
        self.step_link: StepLink | None = None  # from connect_steps() until serve_steps() takes it
        self.placement_version = spec.placement_version
        # Written by prepare_placement (a Ray call on another actor thread, while steps run), read
        # by the step that switches: the lock keeps the two from seeing half an update.
        self._placement_lock = threading.Lock()
        self._pending: PlacementUpdate | None = None

    def ensure_weights_fit(self, weight_bytes: int) -> None:
        """A share of the checkpoint that cannot fit this worker's GPU fails now, not halfway."""
        ensure_weights_fit(self.device, weight_bytes, f"{self.kind} worker rank {self.rank}")

    def dispatch_stats(self) -> WorkerStats:
        """What this worker did since the last call (the counters restart)."""
        busy, self.busy_seconds = self.busy_seconds, 0.0
        steps, self.num_steps = self.num_steps, 0
        return WorkerStats(self.rank, self.kind, self.dispatcher.stats.snapshot_and_reset(), busy, steps)

    def rank_device(self) -> RankDevice:
        """Where this rank's tensors live: the group chooses its backend from every rank's answer."""
        node = _node_id() or socket.gethostname()
        if self.device.type != "cuda":
            return RankDevice("cpu", node)
        return RankDevice("cuda", node, _gpu_identity(self.device))

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 publishes where the group meets: this node's real address and a free port."""
        return pick_rendezvous_address(), pick_free_port()

    def prepare_placement(self, update: PlacementUpdate) -> None:
        """Get ready to switch to `update` (an expert worker loads the copies it lacks); the switch
        comes with the first step that carries its version, or with the next `join`."""
        if update.version <= self.placement_version:
            raise ValueError(f"placement {update.version} is not newer than this worker's "
                             f"{self.placement_version}")
        if update.expert_map.num_layers != self.config.num_hidden_layers:
            raise ValueError(f"placement {update.version} maps {update.expert_map.num_layers} layers, "
                             f"the model has {self.config.num_hidden_layers}")
        run_at_low_priority(lambda: self.stage_placement(update))  # the steps go first
        with self._placement_lock:
            self._pending = update

    def stage_placement(self, update: PlacementUpdate) -> None:
        """Load what `update` needs ahead of the switch (while steps go on)."""

    def follow_placement(self, version: int) -> None:
        """Switch to placement `version` unless already on it: at a step boundary, before the step.

        Within a process group only the expert map changes (ranks and world size stay); a rank
        that moves needs a new group, so it switches in `join`."""
        if version == self.placement_version:
            return
        with self._placement_lock:
            update, self._pending = self._pending, None
        if update is None or update.version != version:
            prepared = update.version if update else "none"
            raise RuntimeError(f"rank {self.rank}: the step runs on placement {version}, this worker is on "
                               f"{self.placement_version} and prepared {prepared}")
        if self.transport is not None and (update.rank, update.expert_map.world_size) != (
                self.rank, self.spec.world_size):
            raise RuntimeError(f"rank {self.rank}: placement {version} moves it to rank {update.rank} of "
                               f"{update.expert_map.world_size}, which needs a new process group")
        self.adopt_placement(update)
        self.spec = dataclasses.replace(self.spec, expert_map=update.expert_map, placement_version=version)
        self.rank = update.rank
        self.placement_version = version
        if self.transport is not None:
            self.on_joined()  # the dispatcher's tables follow the map; the process group stays

    def adopt_placement(self, update: PlacementUpdate) -> None:
        """Make what `stage_placement` loaded the worker's own (an expert worker's new experts)."""

    def join(self, master_addr: str, master_port: int, backend: str,
             placement_version: int | None = None) -> None:
        """Join the group's process group; with `placement_version`, on that placement (prepared
        before: the re-formed group may have more or fewer workers, and this one a new rank)."""
        if placement_version is not None:
            self.follow_placement(placement_version)
        timeout = timedelta(seconds=self.spec.collective_timeout_s)
        self.transport = init_process_group(self.rank, self.spec.world_size, master_addr, master_port,
                                            backend, self.device, timeout)
        self.on_joined()

    def on_joined(self) -> None:
        """Build what needs the transport (the dispatcher)."""

    def connect_steps(self, route: StepRoute) -> None:
        """Connect to the engine's step broadcast (cluster/step_loops.py); serve_steps() follows."""
        if self.step_link is not None:
            self.step_link.close()
        self.step_link = StepLink.connect(route)

    def serve_steps(self) -> int:
        """Run every step the engine broadcasts until it closes the channel; the steps served.

        Holds one thread of the actor all along (the actor has others for probes and stats)."""
        link, self.step_link = self.step_link, None
        if link is None:
            raise RuntimeError("serve_steps() before connect_steps()")
        return serve_steps(link, self.run_step)

    def run_step(self, message: StepMessage) -> object:
        """This worker's part of one step, as the Ray-call path's `execute` would run it."""
        raise NotImplementedError

    def where(self) -> dict:
        """Where this worker runs: tests assert placement with it."""
        info = {"rank": self.rank, "pid": os.getpid(), "hostname": socket.gethostname(),
                "address": pick_rendezvous_address(), "device": str(self.device)}
        node_id = _node_id()
        if node_id is not None:
            info["node_id"] = node_id
        return info

    def leave(self) -> None:
        if self.transport is not None:
            self.transport.destroy()
            self.transport = None


def _node_id() -> str | None:
    """The Ray node this worker runs on, if it runs under Ray (the worker does not depend on Ray)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _gpu_identity(device: torch.device) -> str:
    """The physical GPU behind `device`: two ranks given fractions of one GPU report the same."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return str(uuid)
    return f"pci:{getattr(props, 'pci_bus_id', device.index)}"
