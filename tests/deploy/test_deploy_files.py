"""The image, the Grafana dashboard, the SkyPilot task and the locustfile, checked by structure
(none of them can run here: no registry, no Grafana, no cloud, Locust optional)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re

from tests.deploy.manifests import (
    CLOSED_PORTS,
    DEPLOY,
    container_ports,
    dashboard_exprs,
    load_dashboard,
    load_yaml_docs,
    pod_templates,
    promql_metric_names,
)


def test_dockerfile_runs_moe_serve_and_exposes_only_the_served_ports(rayservice):
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text
    (cmd,) = re.findall(r"^CMD (.+)$", text, re.M)
    assert "moe-serve serve" in " ".join(json.loads(cmd))
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    head_ports = container_ports(pod_templates(rayservice)["head"])
    assert exposed == {head_ports["serve"], head_ports["serve-grpc"], head_ports["metrics"]}
    assert not exposed & CLOSED_PORTS
    images = {c["image"] for t in pod_templates(rayservice).values() for c in t["spec"]["containers"]}
    assert len(images) == 1  # head and workers run the same build


# download.pytorch.org/whl builds of torch 2.13.0 (pytorch's RELEASE.md: CUDA 12.6 and 13.0 stable,
# 13.2 experimental); naming another (cu128 was 2.11's) gives an image or venv without torch.
TORCH_2_13_CUDA_BUILDS = {"cu126", "cu130", "cu132"}


def test_every_cuda_build_named_in_deploy_is_one_torch_2_13_has():
    named = {}
    for path in [DEPLOY / "Dockerfile", *sorted(DEPLOY.rglob("*.yaml"))]:
        for tag in re.findall(r"\bcu\d{3}\b", path.read_text()):
            named.setdefault(tag, []).append(path.name)
    assert "cu130" in named  # the GPU image of the Dockerfile and the RayService
    assert set(named) <= TORCH_2_13_CUDA_BUILDS, named


def test_dashboard_covers_the_issue_and_reads_only_our_families():
    dashboard = load_dashboard()
    names = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard)))
    assert names and all(n.startswith("ray_moe_serve_") for n in names), names
    for family in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                   "e2e_request_latency_seconds"):
        assert f"ray_moe_serve_{family}_bucket" in names
    for name in ("generation_tokens_total", "num_requests_waiting", "kv_blocks_used",
                 "dispatch_seconds_total", "combine_seconds_total", "worker_restarts_total"):
        assert f"ray_moe_serve_{name}" in names
    (heatmap,) = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert "by (layer, expert)" in heatmap["targets"][0]["expr"]
    panel_ids = [p["id"] for p in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))


def test_promql_name_parser():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(ray_a_bucket{model=~"$model", x="by(y)"}'
            '[$__rate_interval]))) / on() group_left() sum(ray_b) + label_values(ray_c, model)')
    assert promql_metric_names(expr) == {"ray_a_bucket", "ray_b", "ray_c"}


def test_skypilot_task_launches_a_ray_cluster_with_the_mixtral_config():
    (task,) = load_yaml_docs(DEPLOY / "skypilot" / "ray-cluster.yaml")
    assert {"resources", "num_nodes", "setup", "run"} <= task.keys()
    assert task["num_nodes"] >= 2 and set(task["resources"]["ports"]) == {8000, 9000}
    assert "ray start --head" in task["run"] and "ray start --address" in task["run"]
    served = re.findall(r"serve run .*?(deploy/serve/\S+\.yaml)", task["run"])
    assert served and all((DEPLOY.parent / p).is_file() for p in served)
    (config,) = load_yaml_docs(DEPLOY.parent / served[0])
    assert task["envs"]["MODEL_DIR"] == config["applications"][0]["args"]["model_dir"]


def test_locustfile_defines_users_with_tasks():
    path = DEPLOY / "locust" / "locustfile.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    compile(tree, str(path), "exec")
    users = [n for n in tree.body if isinstance(n, ast.ClassDef) and any(
        getattr(b, "id", None) == "HttpUser" for b in n.bases)]
    assert users
    tasks = [f for f in users[0].body if isinstance(f, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and getattr(d.func, "id", None) == "task" for d in f.decorator_list)]
    assert len(tasks) >= 2
    if importlib.util.find_spec("locust") is not None:  # only where Locust is installed
        spec = importlib.util.spec_from_file_location("moe_serve_locustfile", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.OpenAIUser.tasks
