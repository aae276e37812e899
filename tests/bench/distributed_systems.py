"""The systems bench_distributed times, besides the engine's own executors: the two-node
cluster, the worker stats drained after each step, and the alternative control paths (Ray calls
with the dispatch rule applied, a Compiled Graph prototype, no-op fan-outs). See
tests/bench/bench_distributed.py's docstring.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import ray

from cluster.dispatch_mode import with_dispatch_mode
from cluster.ray_executor import RayExecutor
from cluster.step_loops import open_step_loops
from workers.group.step_link import StepLink
from workers.group.step_loop import serve_steps
from workers.group.step_message import StepMessage, StepRoute
from workers.model.batch_spec import ScheduledBatch

ATTENTION_NODE, EXPERT_NODE = {"moe_attention": 2}, {"moe_expert": 4}


def start_cluster():
    from ray.cluster_utils import Cluster

    # ray.init(address="127.0.0.1:port") rewrites loopback to the machine's outward address;
    # this benchmark stays on loopback (as tests/integration/test_multinode_cluster.py does).
    ray._private.services.resolve_ip_for_localhost = lambda host: host
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "resources": ATTENTION_NODE,
        "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources=EXPERT_NODE)
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


@ray.remote(num_cpus=0, max_concurrency=2)  # threaded, like the workers
class NoOp:
    def __init__(self) -> None:
        self.link: StepLink | None = None

    def ping(self, *_args) -> None:
        return None

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def connect_steps(self, route: StepRoute) -> None:  # as GroupMember's: a step loop of no-ops
        self.link = StepLink.connect(route)

    def serve_steps(self) -> int:
        return serve_steps(self.link, lambda _message: None)


def _take_busy(worker) -> float:
    busy, worker.busy_seconds = worker.busy_seconds, 0.0
    return busy


@dataclass(frozen=True)
class StepStats:
    """What the workers saw in one step (seconds)."""

    rank0_busy: float | None  # the attention worker inside execute; None where workers do not report it
    rank0_moe: float  # the attention worker's dispatch + combine, all layers
    experts: float  # the busiest expert worker's grouped experts, all layers


def drain_stats(group: RayExecutor) -> StepStats:
    stats = group.dispatch_stats()
    # WorkerStats wraps the dispatcher's snapshot; older workers return the snapshot bare.
    snap = getattr(stats[0], "dispatch", stats[0])
    if all(hasattr(s, "busy_seconds") for s in stats):
        rank0_busy = stats[0].busy_seconds
        busy = [s.busy_seconds for s in stats[group.num_attention_workers:]]
    else:
        rank0_busy = None
        busy = ray.get([w.__ray_call__.remote(_take_busy) for w in group.experts])
    return StepStats(rank0_busy, snap.dispatch_seconds + snap.combine_seconds, max(busy))


class OverRayCalls:
    """The group stepped by the reference control path: one Ray actor call per worker per step."""

    def __init__(self, group: RayExecutor) -> None:
        self.group = group

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        return await self.group.execute_over_ray(batches)


class LowLatencyGroup:
    """An executor with the engine's per-step rule applied: decode steps up to the threshold
    dispatch through fixed-capacity buffers (cluster/dispatch_mode.py)."""

    def __init__(self, group, max_tokens: int) -> None:
        self.group, self.max_tokens = group, max_tokens

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        return await self.group.execute(with_dispatch_mode(batches, self.max_tokens))


def _expert_step(worker, _step: int) -> int:
    return worker.execute()


class CompiledGroup:
    """Prototype: RayExecutor.execute as a Ray Compiled Graph (the control path only).

    The same actors and the same per-worker calls, compiled once: each step writes the
    batches into shared-memory channels instead of submitting one Ray task per worker.
    Expert workers take the step number, so their input is a few bytes.
    """

    def __init__(self, group: RayExecutor) -> None:
        from ray.dag import InputNode, MultiOutputNode

        a = group.num_attention_workers
        with InputNode() as inp:  # inp[0]: step number, inp[1 + i]: attention worker i's batch
            outs = [w.execute.bind(inp[1 + i]) for i, w in enumerate(group.attention)]
            outs += [w.__ray_call__.bind(_expert_step, inp[0]) for w in group.experts]
            dag = MultiOutputNode(outs)
        self.num_attention_workers = a
        self.dag = dag.experimental_compile(enable_asyncio=True)
        self.num_steps = 0

    async def execute(self, batches: tuple[ScheduledBatch, ...]):
        self.num_steps += 1
        futures = await self.dag.execute_async(self.num_steps, *batches)  # one per output
        results = await asyncio.gather(*futures)
        return tuple(results[: self.num_attention_workers])

    def teardown(self) -> None:
        self.dag.teardown()


class NoOpFanOut:
    """Three no-op actors placed like the group's workers: the bare control path."""

    def __init__(self) -> None:
        self.actors = [NoOp.options(resources={"moe_attention": 0.5}).remote()]
        self.actors += [NoOp.options(resources={"moe_expert": 0.5}).remote() for _ in range(2)]
        ray.get([x.ping.remote() for x in self.actors])

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        first, *rest = self.actors
        await asyncio.gather(first.ping.remote(batches[0]), *(x.ping.remote() for x in rest))

    async def single(self, index: int) -> None:
        await self.actors[index].ping.remote()

    def teardown(self) -> None:
        for x in self.actors:
            ray.kill(x)


class ChannelNoOpFanOut:
    """The same three no-op actors, stepped through a step broadcast: the bare channel."""

    def __init__(self, noop: NoOpFanOut) -> None:
        nodes = ray.get([x.node.remote() for x in noop.actors])
        self.loops = open_step_loops(noop.actors, nodes, 1, timeout_s=60)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        broadcast = self.loops.broadcast
        seq = broadcast.publish(StepMessage(batches[0].low_latency_tokens, batches))
        await asyncio.gather(*(broadcast.result(rank, seq) for rank in range(len(broadcast.vias))))

    def teardown(self) -> None:
        self.loops.close()


class CompiledNoOpFanOut(NoOpFanOut):
    def __init__(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        super().__init__()
        first, *rest = self.actors
        with InputNode() as inp:  # as CompiledGroup: inp[0] a step number, inp[1] the batch
            dag = MultiOutputNode([first.ping.bind(inp[1])] + [x.ping.bind(inp[0]) for x in rest])
        self.dag = dag.experimental_compile(enable_asyncio=True)

    async def execute(self, batches: tuple[ScheduledBatch, ...]) -> None:
        await asyncio.gather(*await self.dag.execute_async(0, *batches))

    def teardown(self) -> None:
        self.dag.teardown()
        super().teardown()


