"""deploy/ checked against the schemas of the systems that read it, without running them.

KubeRay objects against KubeRay v1.7.0's CRD schemas made strict (unknown fields rejected);
the core Kubernetes objects against small structural schemas; the ports that must stay inside the
cluster. Serve configs: test_serve_configs.py; image, dashboard, SkyPilot, Locust: test_deploy_files.py.
"""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import docs_of_kind
from tests.deploy.manifests import (
    CLOSED_PORTS,
    CRD_DIR,
    admitted_ports,
    container_ports,
    crd_validator,
    kuberay_docs,
    pod_templates,
    ports_of_service,
    ray_resources,
    strict_schema,
)

OWN_LABELS = {"app.kubernetes.io/name": "moe-serve"}


def strict_crd(file_name: str, *, strict: bool = True):
    """The validator of a KubeRay CRD's schema, made strict unless told otherwise."""
    if not (CRD_DIR / file_name).is_file():
        pytest.skip(f"KubeRay CRD {file_name} not found in {CRD_DIR} (schema data beside the repository)")
    return crd_validator(file_name, strict=strict)


# --- KubeRay objects against the CRDs --------------------------------------------------------

def test_rayservice_is_valid_under_the_strict_crd(rayservice):
    strict_crd("ray.io_rayservices.yaml").validate(rayservice)


def test_embedded_raycluster_is_valid_as_a_raycluster(rayservice):
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "moe-serve"},
               "spec": rayservice["spec"]["rayClusterConfig"]}
    strict_crd("ray.io_rayclusters.yaml").validate(cluster)


@pytest.mark.parametrize("where", [
    ("spec",), ("spec", "rayClusterConfig"), ("spec", "rayClusterConfig", "headGroupSpec"),
    ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
])
def test_an_unknown_field_is_rejected(rayservice, where):
    validator = strict_crd("ray.io_rayservices.yaml")
    bad = copy.deepcopy(rayservice)
    node = bad
    for key in where:
        node = node[key]
    node["rayStartParam"] = {"num-cpus": "1"}  # a typo the API server would prune without a word
    strict_crd("ray.io_rayservices.yaml", strict=False).validate(bad)  # the CRD as published lets it by
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        validator.validate(bad)


def test_strict_schema_closes_only_what_the_crd_closes():
    schema = {"type": "object", "properties": {
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}}}}
    strict = strict_schema(schema)
    jsonschema.validate({"open": {"b": 1}, "map": {"any": "x"}, "closed": {"a": "x"}}, strict)
    with pytest.raises(jsonschema.ValidationError, match="'b' was unexpected"):
        jsonschema.validate({"closed": {"b": 1}}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"other": 1}, strict)
    assert "additionalProperties" not in schema  # the input is left as it was


def test_missing_crds_skip_with_the_reason(monkeypatch, tmp_path):
    import tests.deploy.test_manifests as this

    monkeypatch.setattr(this, "CRD_DIR", tmp_path)
    with pytest.raises(pytest.skip.Exception, match="ray.io_rayservices.yaml not found"):
        strict_crd("ray.io_rayservices.yaml")


def test_a_wrongly_typed_field_is_rejected(rayservice):
    bad = copy.deepcopy(rayservice)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # not a string
    with pytest.raises(jsonschema.ValidationError):
        strict_crd("ray.io_rayservices.yaml").validate(bad)


# --- The RayService's pieces fit together ----------------------------------------------------

def test_worker_kinds_are_steered_to_their_own_gpu_groups(rayservice):
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args = config["applications"][0]["args"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    auto = args["autoscaling"]
    for kind, count in (("attention", args["num_attention_workers"]), ("expert", args["num_expert_workers"])):
        wanted = args[f"{kind}_resources"]
        (group,) = [g for g in groups.values() if set(wanted) <= set(ray_resources(g))]
        other = "expert" if kind == "attention" else "attention"
        assert not set(args[f"{other}_resources"]) & set(ray_resources(group)), f"{kind}: both kinds"
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # one worker per GPU pod
        # The autoscaler can give Serve every group it may ask for, and one group is always up.
        assert group["minReplicas"] >= auto["min_replicas"] * count
        # A group's expert plane may grow past its starting expert workers (expert_autoscaling).
        most = args.get("expert_autoscaling", {}).get("max_workers", count) if kind == "expert" else count
        assert group["maxReplicas"] >= auto["max_replicas"] * most
    head = cluster["headGroupSpec"]
    assert "nvidia.com/gpu" not in json.dumps(head["template"]["spec"]["containers"][0]["resources"])


def test_ports_match_the_serve_config(rayservice):
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    http_port, grpc_port = config["http_options"]["port"], config["grpc_options"]["port"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        ports = container_ports(group["template"])
        assert ports["serve"] == http_port and ports["serve-grpc"] == grpc_port  # proxies run on every node
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])
    serve_ports = {p["name"]: p["port"] for p in rayservice["spec"]["serveService"]["spec"]["ports"]}
    assert serve_ports == {"serve": http_port, "serve-grpc": grpc_port}


def test_secrets_feed_the_api_key_and_ray_token_auth(rayservice):
    secrets = {s["metadata"]["name"]: s for s in docs_of_kind("Secret")}
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    token_secret = secrets[cluster["authOptions"]["secretName"]]
    assert "auth_token" in token_secret["stringData"]  # the key KubeRay reads
    for name, template in pod_templates(rayservice).items():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        ref = env["MOE_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]["stringData"], name
        assert not any("value" in e and "KEY" in e["name"] for e in env.values()), "a key written in clear"


# --- Nothing exposes Ray's control ports -----------------------------------------------------

def test_no_service_or_ingress_exposes_ray_control_ports(rayservice):
    services = docs_of_kind("Service") + [rayservice["spec"]["serveService"]]
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    if "headService" in head:
        services.append(head["headService"])
    for service in services:
        assert not ports_of_service(service) & CLOSED_PORTS, service["metadata"]
    assert not docs_of_kind("Ingress"), "an Ingress would need a check of its backends here"
    # KubeRay's own head Service lists the head container's ports (6379, 8265, 10001 among them):
    # it must stay cluster-internal, with no KubeRay-made Ingress in front.
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)


def test_network_policy_keeps_ray_control_ports_inside(rayservice):
    (policy,) = docs_of_kind("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for name, template in pod_templates(rayservice).items():
        assert selected.items() <= template["metadata"]["labels"].items(), f"{name} pods not covered"
    from_anywhere = admitted_ports(policy, OWN_LABELS, {"anywhere"})
    assert from_anywhere is not None and not from_anywhere & CLOSED_PORTS
    assert from_anywhere == {8000, 9000}
    from_other_pods = admitted_ports(policy, OWN_LABELS, {"anywhere", "cluster"})
    assert from_other_pods is not None and from_other_pods & CLOSED_PORTS == {8265}
    # ... and 8265 only for the KubeRay operator, which submits serveConfigV2 through it.
    (dashboard_rule,) = [rule for rule in policy["spec"]["ingress"]
                         if {p["port"] for p in rule.get("ports", [])} == {8265}]
    assert all(p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
               for p in dashboard_rule["from"])


def test_the_policy_check_sees_an_open_port():
    (policy,) = docs_of_kind("NetworkPolicy")
    leaky = copy.deepcopy(policy)
    leaky["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 6379}]})
    assert 6379 in admitted_ports(leaky, OWN_LABELS, {"anywhere"})
    leaky["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]})
    assert admitted_ports(leaky, OWN_LABELS, {"cluster"}) is None


# --- Core Kubernetes objects, structurally ---------------------------------------------------

def closed(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """A JSON schema object that allows exactly these properties."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = closed({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                      "namespace": {"type": "string"}, "labels": STRING_MAP, "annotations": STRING_MAP},
                     required=("name",))
LABEL_SELECTOR = closed({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}})
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
PROTOCOL = {"enum": ["TCP", "UDP", "SCTP"]}
SERVICE_PORT = closed({"name": {"type": "string"}, "port": PORT,
                       "targetPort": {"anyOf": [PORT, {"type": "string"}]},
                       "protocol": PROTOCOL, "appProtocol": {"type": "string"}}, required=("port",))
POLICY_PEER = closed({"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR,
                      "ipBlock": {"type": "object"}})
POLICY_PORT = closed({"protocol": PROTOCOL, "port": PORT, "endPort": PORT})
POLICY_RULE = closed({"from": {"type": "array", "items": POLICY_PEER | {"minProperties": 1}},
                      "ports": {"type": "array", "items": POLICY_PORT}})
POD_METRICS_ENDPOINT = closed({"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                               "relabelings": {"type": "array"}}, required=("port",))


def k8s_object(api_version: str, kind: str, body: dict, required: tuple[str, ...] = ("spec",)) -> dict:
    header = {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": OBJECT_META}
    return closed(header | body, required=("apiVersion", "kind", "metadata", *required))


CORE_SCHEMAS = {
    "Secret": k8s_object("v1", "Secret", {"type": {"type": "string"}, "stringData": STRING_MAP,
                                          "data": STRING_MAP}, required=()),
    "Service": k8s_object("v1", "Service", {"spec": {
        "type": "object", "required": ["ports"],
        "properties": {"ports": {"type": "array", "minItems": 1, "items": SERVICE_PORT}}}}),
    "NetworkPolicy": k8s_object("networking.k8s.io/v1", "NetworkPolicy", {"spec": closed({
        "podSelector": LABEL_SELECTOR,
        "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
        "ingress": {"type": "array", "items": POLICY_RULE}}, required=("podSelector",))}),
    "PodMonitor": k8s_object("monitoring.coreos.com/v1", "PodMonitor", {"spec": closed({
        "selector": LABEL_SELECTOR, "namespaceSelector": {"type": "object"},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": POD_METRICS_ENDPOINT}},
        required=("selector", "podMetricsEndpoints"))}),
}


def test_every_kubernetes_object_is_known_and_well_formed(rayservice):
    kinds = []
    for path, doc in kuberay_docs():
        kinds.append(doc["kind"])
        if doc["kind"] == "RayService":
            continue  # the CRD tests above
        assert doc["kind"] in CORE_SCHEMAS, f"{path.name}: add a schema for {doc['kind']}"
        jsonschema.validate(doc, CORE_SCHEMAS[doc["kind"]])
    assert sorted(kinds) == ["NetworkPolicy", "PodMonitor", "RayService", "Secret", "Secret"]
    jsonschema.validate(rayservice["spec"]["serveService"] | {"apiVersion": "v1", "kind": "Service"},
                        CORE_SCHEMAS["Service"])


def test_structural_schemas_reject_a_misspelt_field():
    (policy,) = docs_of_kind("NetworkPolicy")
    bad = copy.deepcopy(policy)
    bad["spec"]["ingres"] = bad["spec"].pop("ingress")
    with pytest.raises(jsonschema.ValidationError, match="ingres"):
        jsonschema.validate(bad, CORE_SCHEMAS["NetworkPolicy"])


def test_podmonitor_scrapes_every_ray_pod_on_the_metrics_port(rayservice):
    (monitor,) = docs_of_kind("PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, template in pod_templates(rayservice).items():
        assert selector.items() <= template["metadata"]["labels"].items(), name
        assert endpoint["port"] in container_ports(template), name
