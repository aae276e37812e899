"""Serve configs (and the RayService's serveConfigV2) against Ray's own `ServeDeploySchema`, with no
unknown keys, and our app builder accepting their `args` exactly as Serve's build task calls it."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.manifests import (
    DEPLOY,
    load_yaml_docs,
    unknown_keys,
)

SERVE_CONFIGS = sorted((DEPLOY / "serve").glob("*.yaml"))


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_is_a_valid_serve_deploy_schema(path):
    from ray.serve.schema import ServeDeploySchema

    (config,) = load_yaml_docs(path)
    ServeDeploySchema.model_validate(config)
    # ServeDeploySchema tolerates unknown keys (forward compatibility); ours must have none.
    assert unknown_keys(config, ServeDeploySchema) == []


def test_serve_config_v2_is_valid_and_equals_the_mixtral_serve_config(rayservice):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(config, ServeDeploySchema) == []
    (mixtral,) = load_yaml_docs(DEPLOY / "serve" / "mixtral-8x7b.yaml")
    assert config == mixtral


def test_unknown_keys_finds_a_typo_serve_would_ignore():
    from ray.serve.schema import ServeDeploySchema

    (config,) = load_yaml_docs(DEPLOY / "serve" / "demo.yaml")
    config["applications"][0]["deployments"] = [{"name": "EngineDeployment", "num_replica": 2}]
    config["grpc_options"]["prot"] = 9001
    ServeDeploySchema.model_validate(config)  # Serve itself would take it
    assert sorted(unknown_keys(config, ServeDeploySchema)) == ["applications.deployments.num_replica",
                                                              "grpc_options.prot"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_builder_accepts_the_configs_args(path, demo_tokenizer_dir):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    from gateway.grpc_stubs import HEALTH_SERVICER_ADDER, MOE_SERVE_SERVICER_ADDER

    (config,) = load_yaml_docs(path)
    servicers = config["grpc_options"]["grpc_servicer_functions"]
    assert servicers == [MOE_SERVE_SERVICER_ADDER, HEALTH_SERVICER_ADDER]
    (app_config,) = config["applications"]
    args = dict(app_config["args"])
    args.setdefault("model_dir", str(demo_tokenizer_dir))  # the demo: no checkpoint written here
    # What Serve's build task does with `import_path` and `args`.
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config["import_path"]), args)
    ingress = app._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert (ingress.name, engine.name) == ("Ingress", "EngineDeployment")
    auto = engine._deployment_config.autoscaling_config
    for key, value in args["autoscaling"].items():
        assert getattr(auto, key) == value
    elastic = engine.init_args[0].elastic  # the EngineOptions each replica builds from
    assert elastic.rebalance.enabled == ("rebalance" in args)
    assert elastic.autoscaling.enabled == ("expert_autoscaling" in args)
    # Only the starting workers are reserved, whatever expert autoscaling may add later.
    bundles = engine._replica_config.placement_group_bundles
    assert len(bundles) == 1 + args["num_attention_workers"] + args["num_expert_workers"]
    # The engine replica's own bundle (first) reserves no GPU when the model has expert workers.
    gpus = args.get("num_gpus_per_worker", 0)
    assert [b.get("GPU", 0) for b in bundles] == [0] + [gpus] * (len(bundles) - 1)


def test_the_mixtral_config_runs_on_gpus_with_kv_sized_from_their_memory():
    (config,) = load_yaml_docs(DEPLOY / "serve" / "mixtral-8x7b.yaml")
    args = config["applications"][0]["args"]
    assert (args["device"], args["dtype"], args["num_gpus_per_worker"]) == ("cuda", "bfloat16", 1)
    assert 0 < args["gpu_memory_utilization"] <= 1
    assert "num_kv_blocks" not in args  # a fixed count would ignore the GPU's memory


def test_builder_refuses_unknown_and_proxy_args(demo_tokenizer_dir):
    from gateway.serve_config import app_builder

    with pytest.raises(ValueError, match="unknown args.*num_experts"):
        app_builder({"model_dir": str(demo_tokenizer_dir), "num_experts": 2})
    with pytest.raises(ValueError, match="http_options"):
        app_builder({"model_dir": str(demo_tokenizer_dir), "port": 8001})
    with pytest.raises(ValueError, match="autoscaling"):
        app_builder({"model_dir": str(demo_tokenizer_dir), "autoscaling": {"max_replica": 2}})


def test_builder_takes_the_api_key_from_the_environment(demo_tokenizer_dir, monkeypatch):
    from gateway.serve_config import serve_options_from_args

    monkeypatch.setenv("MOE_SERVE_API_KEY", "sk-from-secret")
    assert serve_options_from_args({"model_dir": str(demo_tokenizer_dir)}).api_key == "sk-from-secret"
    options = serve_options_from_args({"model_dir": str(demo_tokenizer_dir), "expert_replicas": {"0:3": 2}})
    assert options.expert_replicas == {(0, 3): 2}


