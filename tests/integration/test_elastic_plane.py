"""The elastic expert plane on a real Ray model group (issue 16): a rebalance, a scale-up and a
scale-down while 16 greedy streams run give exactly the single-process engine's tokens, and
the workers hold what each placement says; the controller (ExpertPlane) makes those changes
itself from the load it reads.

The first test prepares each change (weights loaded, new workers started) before the streams
and makes it while they run, so the switch or re-forming lands mid-stream whatever the
machine's speed; the controller's test makes whole changes under load as serving does."""

from __future__ import annotations

import asyncio
import random

import pytest
import ray
from ray.util.placement_group import placement_group_table

from cluster.actor_state import actor_id
from cluster.distributed_engine import build_distributed_engine
from cluster.elastic_config import ElasticConfig, ExpertAutoscalingConfig, RebalanceConfig
from cluster.engine_config import EngineConfig
from cluster.expert_plane import ExpertPlane
from cluster.group_reshape import finish_resize, finish_switch, prepare_resize, prepare_switch
from cluster.local_engine import build_local_engine
from cluster.placement import place_experts
from cluster.rebalance_policy import place_for_workers
from cluster.topology import TopologyConfig
from tests.model_helpers import save_hf_mixtral
from workers.model.sampling_params import SamplingParams

NUM_STREAMS = 16
ENGINE_CFG = EngineConfig(max_num_seqs=32, max_num_batched_tokens=128, block_size=4, num_kv_blocks=1024)
GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
DEADLINE_S = 240.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic_model")
    save_hf_mixtral(out, num_hidden_layers=2, num_local_experts=8, max_position_embeddings=512)
    return out


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 100) for _ in range(rng.randint(2, 24))] for _ in range(NUM_STREAMS)]


@pytest.fixture(scope="module")
def reference(model_dir):
    return asyncio.run(_streams(build_local_engine(model_dir, ENGINE_CFG)))


async def _streams(engine, during=None, before=None, must_outlast: bool = True) -> list[list[int]]:
    """All streams at once; `during()` is awaited while they run (with `must_outlast`, it must end
    before they do), `before()` before they start (its result goes to `during`)."""
    async def one(i, prompt):
        tokens, last = [], None
        async for out in engine.generate(f"s{i}", prompt, GREEDY):
            tokens += out.token_ids
            last = out
        assert last.finish_reason == "length", last  # no request fails
        return tokens

    prepared = await before() if before is not None else None
    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts())]
    if during is not None:
        start = engine.stats().num_generated_tokens
        while engine.stats().num_generated_tokens < start + NUM_STREAMS * 4:  # every stream under way
            await asyncio.sleep(0.01)
        await (during(prepared) if before is not None else during())
        assert not must_outlast or not all(t.done() for t in tasks), "the streams ended before the change did"
    try:
        got = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)
        while getattr(engine.executor, "background", None):  # e.g. a removed worker's bundle released
            await asyncio.wait_for(asyncio.gather(*engine.executor.background), DEADLINE_S)
        return got
    finally:
        await engine.shutdown()


def build(model_dir, num_expert_workers: int = 2):
    topology = TopologyConfig(num_attention_workers=1, num_expert_workers=num_expert_workers,
                              num_cpus_per_worker=0.1)
    return build_distributed_engine(model_dir, ENGINE_CFG, topology)


def assert_workers_hold_the_placement(group) -> None:
    held = ray.get([w.held_experts.remote() for w in group.experts])
    for index, pairs in enumerate(held):
        want = {(layer, e) for layer in range(group.placement.num_layers)
                for e in group.placement.experts_on(layer, index)}
        assert set(pairs) == want


def test_rebalance_scale_up_and_scale_down_under_load_keep_greedy_ids(ray_local, model_dir, reference):
    engine, group = build(model_dir)
    pauses = []
    try:
        # A placement unlike the start's: replicas of two experts, balanced for a made-up load.
        moved = place_experts(2, 8, 2, replicas={(0, 3): 2, (1, 6): 2},
                              load={(layer, e): float(e + 1) for layer in range(2) for e in range(8)})

        async def prepare_rebalance():
            return await prepare_switch(group, moved)

        async def rebalance(prepared):
            async with group.step_lock():
                finish_switch(group, moved, *prepared)

        assert asyncio.run(_streams(engine, rebalance, prepare_rebalance)) == reference
        assert group.placement == moved and group.placement_version == 1
        assert_workers_hold_the_placement(group)

        def resize_to(num_workers: int, dropped: tuple[int, ...] = ()):
            async def prepare():
                kept = [w for w in range(group.num_expert_workers) if w not in dropped]
                placement = place_for_workers(group.placement, num_workers, None, kept=kept[:num_workers])
                return await prepare_resize(group, placement, dropped)

            async def resize(prepared):
                async with group.step_lock():
                    pauses.append(await finish_resize(group, prepared))
            return resize, prepare

        assert asyncio.run(_streams(engine, *resize_to(3))) == reference
        assert group.num_expert_workers == 3 and group.placement_version == 2
        assert_workers_hold_the_placement(group)
        kept = [actor_id(w) for w in group.workers[:2]]
        (added,) = [slot for slot in group.slots if slot.owned]  # the new worker's own bundle
        emptied = group.slots[2]  # expert worker 1's: a bundle of the group's reservation

        # Down to one: expert worker 1 (the reservation's) and 2 (the added one) leave.
        assert asyncio.run(_streams(engine, *resize_to(1, dropped=(1, 2)))) == reference
        assert group.num_expert_workers == 1 and group.placement_version == 3
        assert [actor_id(w) for w in group.workers] == kept  # the attention worker and expert worker 0 stay
        assert placement_group_table(added.placement_group)["state"] == "REMOVED"  # its bundle went back
        assert group.free_slots == [emptied]  # kept for the next scale-up
        assert_workers_hold_the_placement(group)
        assert len(pauses) == 2 and all(p > 0 for p in pauses)  # re-forming the group is the pause
        assert len(ray.get(group.experts[0].held_experts.remote())) == 2 * 8  # every expert of both layers
        print(f"\nsteps paused {pauses[0] * 1e3:.0f} ms for the scale-up, {pauses[1] * 1e3:.0f} ms for the "
              "scale-down")
    finally:
        group.shutdown()


def test_the_controller_rebalances_and_scales_from_what_it_reads(ray_local, model_dir, reference):
    """Thresholds set so the real load calls for each change: a rebalance with replicas (any gain
    is enough), then autoscaling on busy time (any is enough) up to its maximum, and back down
    to its minimum once idle."""
    engine, group = build(model_dir)
    config = ElasticConfig(
        rebalance=RebalanceConfig(enabled=True, interval_s=0.01, threshold=1.0, min_gain=0.0,
                                  extra_copies_per_layer=2, min_tokens=1, cooldown_s=0.0),
    )
    plane = ExpertPlane(group, config)
    seen_stats = []
    plane.stats_listeners.append(seen_stats.append)
    events = []
    group.plane_listeners.append(events.append)
    try:
        def ticks(until):
            """Tick the plane (as the engine replica's reporter does) until `until()`, at most 50 times."""
            async def run():
                for _ in range(50):
                    await asyncio.sleep(0.3)
                    task = await plane.tick()
                    if task is not None:
                        await task
                    if until():
                        return
            return run

        def changes_made(n):
            return lambda: len(events) >= n

        assert asyncio.run(_streams(engine, ticks(changes_made(1)), must_outlast=False)) == reference
        (event,) = events
        assert (event.kind, event.outcome) == ("rebalance", "done")
        assert event.imbalance_after < event.imbalance_before
        assert any(len(group.placement.workers_of(layer, e)) == 2 for layer in range(2) for e in range(8))
        # (The workers switch with the next step; the streams may have ended first.)
        assert seen_stats and all(len(s) == 3 for s in seen_stats)

        plane.config = ElasticConfig(autoscaling=ExpertAutoscalingConfig(
            enabled=True, min_workers=1, max_workers=3, upscale_busy=1e-6, downscale_busy=1e-7,
            upscale_delay_s=0.0, downscale_delay_s=0.0, interval_s=0.01))

        assert asyncio.run(_streams(engine, ticks(changes_made(2)), must_outlast=False)) == reference
        assert (events[-1].kind, events[-1].outcome) == ("scale_up", "done")
        assert group.num_expert_workers == group.target_expert_workers == 3
        assert_workers_hold_the_placement(group)

        asyncio.run(ticks(lambda: group.num_expert_workers == 1)())  # idle: busy fraction 0
        assert [e.kind for e in events[-2:]] == ["scale_down", "scale_down"]
        assert group.num_expert_workers == 1
        assert asyncio.run(_streams(engine)) == reference  # one worker holding every expert
        assert_workers_hold_the_placement(group)
    finally:
        group.shutdown()
