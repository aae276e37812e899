"""The Serve application, composed in one place: `Ingress.bind(EngineDeployment.bind(...))`.

    HTTP / gRPC proxy → Ingress (validate, tokenize, stream) → EngineDeployment (one engine per replica)
                                                                  └ model group: attention + expert workers

`ServeOptions` is everything `moe-serve serve` can set; `build_app` turns it into the two
deployments' options and their Ray resources. An engine replica with expert workers reserves
its whole model group through its placement group: bundle 0 for the replica itself, then one
bundle per worker (`cluster.topology.worker_bundles`). With no expert workers the whole model
runs inside the engine replica (the single-process engine). With `autoscaling` set, Serve adds and
removes engine replicas, so whole model groups (gateway/autoscaling.py); a replica it removes is
drained first (`graceful_shutdown_*`). `elastic` changes each model group's expert plane from
inside (rebalancing, expert-worker autoscaling: cluster/elastic_config.py); a group reserves only
its starting workers, so workers added later need room in the cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ray import serve

from cluster.elastic_config import ElasticConfig
from cluster.engine_config import EngineConfig
from cluster.expert_parallel_config import ExpertParallelConfig
from cluster.fault_config import DEFAULT_STEP_TIMEOUT_S, FaultConfig
from cluster.recovery_policy import RecoveryPolicy
from cluster.topology import TopologyConfig, worker_bundles
from cluster.worker_config import WorkerConfig
from gateway.admission import DEFAULT_MAX_QUEUED_REQUESTS
from gateway.autoscaling import AutoscalingOptions
from gateway.elastic_options import check_expert_plane
from gateway.engine_deployment import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    EngineDeployment,
    EngineOptions,
)
from gateway.ingress import DEFAULT_MAX_BODY_BYTES, Ingress, IngressOptions
from workers.device.memory import DEFAULT_GPU_MEMORY_UTILIZATION
from workers.device.selection import DEVICE_CHOICES

APP_NAME = "moe-serve"
INGRESS_CPUS = 0.1  # the ingress waits on I/O; tokenizing is a sliver of a core
DEFAULT_BATCHED_TOKENS = 512  # tokens per step and attention worker (EngineConfig's default)


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    model_dir: str
    model_name: str | None = None  # what clients put in `model`; None: the directory's name
    num_attention_workers: int = 1
    num_expert_workers: int = 2  # 0: no workers, the whole model runs in the engine replica
    expert_replicas: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (layer, expert) → copies
    device: str = "auto"  # of every worker (and a single-process replica): auto | cpu | cuda
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype on a GPU, float32 on a CPU
    max_num_seqs: int = 64  # per attention worker
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_kv_blocks: int | None = None  # per attention worker; None: 1024 on a CPU, what fits on a GPU
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # of each worker's GPU share
    enforce_eager: bool = False  # no decode CUDA graphs (a single-process replica on a GPU captures them)
    num_gpus_per_worker: float = 0.0  # 1 in production; a fraction shares a GPU; 0: CPU only
    num_cpus_per_worker: float = 0.25  # each worker, and the engine replica itself
    placement_strategy: str = "PACK"  # of a model group's bundles: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    attention_resources: Mapping[str, float] = field(default_factory=dict)  # steer to a node pool
    expert_resources: Mapping[str, float] = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 9000
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # admission batch of an engine replica
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    num_engine_replicas: int = 1  # model groups (fixed; see `autoscaling`)
    autoscaling: AutoscalingOptions | None = None  # set: Serve scales the model groups
    elastic: ElasticConfig = field(default_factory=ElasticConfig)  # each group's expert plane; off
    # Scale-down (and redeploy) drains a replica: Serve stops routing to it and checks every
    # wait_loop_s whether its streams are done, killing it after timeout_s at the latest.
    graceful_shutdown_timeout_s: float = 60.0
    graceful_shutdown_wait_loop_s: float = 1.0
    num_ingress_replicas: int = 1
    max_ongoing_requests: int = 256  # per replica; a stream counts until it ends
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Overload and time (gateway/admission.py, gateway/deadline.py): requests waiting per engine
    # replica before new ones get 429 (and as many queued at the engine's handle before 503), and
    # every request's deadline (None: none unless the client sends X-Request-Timeout).
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    request_timeout_s: float | None = None
    # Worker faults (cluster/fault_config.py, cluster/recovery_policy.py): a step taking longer than
    # step_timeout_s counts as a stalled worker; at most max_recoveries restarts of the model group
    # within recovery_window_s, then every request fails with 503 and /ready turns red.
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    max_recoveries: int = 3
    recovery_window_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_expert_workers < 0:
            raise ValueError(f"num_expert_workers must be >= 0, got {self.num_expert_workers}")
        if self.num_expert_workers == 0 and self.num_attention_workers != 1:
            raise ValueError("without expert workers (single-process engine) there is exactly one "
                             "attention worker")
        for name in ("num_engine_replicas", "num_ingress_replicas", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("port", "grpc_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"{name} must be a TCP port, got {getattr(self, name)}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if not 0 <= self.num_gpus_per_worker <= 1:
            raise ValueError(f"num_gpus_per_worker must be in [0, 1], got {self.num_gpus_per_worker}")
        if self.device == "cuda" and not self.num_gpus_per_worker:
            raise ValueError("device 'cuda' needs GPUs reserved for the workers (Ray hides GPUs from "
                             "actors that reserve none): add --gpus or --gpus-per-worker")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size")
        check_expert_plane(self.elastic, self.num_expert_workers)
        self.engine_options()  # the engine, topology and batching fields validate themselves
        self.ingress_options()

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name

    def topology(self) -> TopologyConfig | None:
        if self.num_expert_workers == 0:
            return None
        return TopologyConfig(num_attention_workers=self.num_attention_workers,
                              num_expert_workers=self.num_expert_workers,
                              num_gpus_per_worker=self.num_gpus_per_worker,
                              num_cpus_per_worker=self.num_cpus_per_worker, strategy=self.placement_strategy,
                              attention_resources=dict(self.attention_resources),
                              expert_resources=dict(self.expert_resources))

    def engine_options(self) -> EngineOptions:
        engine = EngineConfig(max_num_seqs=self.max_num_seqs,
                              max_num_batched_tokens=max(DEFAULT_BATCHED_TOKENS, self.max_num_seqs),
                              num_kv_blocks=self.num_kv_blocks, max_model_len=self.max_model_len,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              num_attention_workers=self.num_attention_workers,
                              enforce_eager=self.enforce_eager)
        faults = FaultConfig(step_timeout_s=self.step_timeout_s,
                             recovery=RecoveryPolicy(self.max_recoveries, self.recovery_window_s))
        return EngineOptions(
            model_name=self.served_model_name,
            model_dir=str(Path(self.model_dir).resolve()), engine=engine, topology=self.topology(),
            expert_parallel=ExpertParallelConfig(expert_replicas=dict(self.expert_replicas)),
            worker=WorkerConfig(device=self.device, dtype=self.dtype), faults=faults,
            max_batch_size=self.max_batch_size,
            batch_wait_timeout_s=self.batch_wait_timeout_s, max_queued_requests=self.max_queued_requests,
            gpu_fraction=self.num_gpus_per_worker or 1.0, elastic=self.elastic,
        )

    def ingress_options(self) -> IngressOptions:
        return IngressOptions(model_dir=str(Path(self.model_dir).resolve()),
                              model_name=self.served_model_name, api_key=self.api_key,
                              max_body_bytes=self.max_body_bytes, request_timeout_s=self.request_timeout_s)


def build_app(options: ServeOptions) -> serve.Application:
    engine_options = options.engine_options()
    topology = engine_options.topology
    group = {} if topology is None else {
        "placement_group_bundles": [replica_bundle(options), *worker_bundles(topology)],
        "placement_group_strategy": topology.strategy,
    }
    # Serve takes either a fixed replica count or an autoscaling config, never both.
    replicas = ({"num_replicas": options.num_engine_replicas} if options.autoscaling is None
                else {"autoscaling_config": options.autoscaling.serve_config()})
    engine = EngineDeployment.options(
        max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
        ray_actor_options=replica_bundle(options, ray_actor_options=True),
        graceful_shutdown_timeout_s=options.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=options.graceful_shutdown_wait_loop_s,
        **replicas, **group,
    ).bind(engine_options)
    return Ingress.options(
        num_replicas=options.num_ingress_replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": INGRESS_CPUS},
    ).bind(engine, options.ingress_options())


def replica_bundle(options: ServeOptions, *, ray_actor_options: bool = False) -> dict[str, float]:
    """What one engine replica reserves for itself. Without expert workers the whole model runs
    in it, so with GPUs it takes a worker's share of one; with a group, its workers do."""
    gpus = options.num_gpus_per_worker if options.num_expert_workers == 0 else 0.0
    if ray_actor_options:
        return {"num_cpus": options.num_cpus_per_worker, "num_gpus": gpus}
    return {"CPU": options.num_cpus_per_worker, **({"GPU": gpus} if gpus else {})}


def resource_demand(options: ServeOptions) -> list[dict[str, float]]:
    """Every bundle the application asks Ray for at its start: ingress replicas, then each
    engine replica with its model group (checked against the cluster before `serve.run`)."""
    engine_options = options.engine_options()
    replicas = (options.num_engine_replicas if options.autoscaling is None
                else options.autoscaling.initial_replicas or options.autoscaling.min_replicas)
    group = [] if engine_options.topology is None else worker_bundles(engine_options.topology)
    return ([{"CPU": INGRESS_CPUS}] * options.num_ingress_replicas
            + [replica_bundle(options), *group] * replicas)
