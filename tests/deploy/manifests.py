"""Loading deploy/ files and the checks on them that are pure functions (no Ray, no network).

Strict CRD validation: a CRD's `openAPIV3Schema` lets unknown fields through wherever it says
nothing (the API server prunes them silently, so a typo like `rayStartParam:` is lost without an
error). `strict_schema` closes every object that lists `properties` and does not say
`x-kubernetes-preserve-unknown-fields`, so a test sees the typo.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"  # data beside the repository, never copied into it
CLOSED_PORTS = frozenset({8265, 6379, 10001})  # dashboard, GCS, Ray client


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/kuberay/ (subdirectories included)."""
    paths = sorted((DEPLOY / "kuberay").rglob("*.yaml"))
    return [(path, doc) for path in paths for doc in load_yaml_docs(path)]


@functools.cache
def crd_schema(file_name: str, version: str = "v1") -> dict:
    """The CRD's schema as published. Cached, and read with libyaml where present: 1 MB of YAML."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / file_name).read_text(), Loader=loader)
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return served["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(file_name: str, *, strict: bool = True) -> jsonschema.protocols.Validator:
    """A validator built once per schema (`jsonschema.validate` re-checks the whole schema each call)."""
    schema = strict_schema(crd_schema(file_name)) if strict else crd_schema(file_name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def strict_schema(schema: Any) -> Any:
    """A copy of `schema` with `additionalProperties: false` on every closed object."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if ("properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema):
        out["additionalProperties"] = False
    return out


def unknown_keys(data: Any, model: type) -> list[str]:
    """Keys of a Serve config that its pydantic model does not declare (Serve ignores them)."""
    from pydantic import BaseModel

    found: list[str] = []
    if not isinstance(data, dict):
        return found
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            found.append(key)
            continue
        for sub in _models_in(field.annotation):
            if isinstance(value, list):
                found += [f"{key}.{k}" for item in value for k in unknown_keys(item, sub)]
            elif isinstance(value, dict) and issubclass(sub, BaseModel):
                found += [f"{key}.{k}" for k in unknown_keys(value, sub)]
    return found


def _models_in(annotation: Any) -> Iterator[type]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def ports_of_service(service: dict) -> set[int]:
    ports = service.get("spec", {}).get("ports", [])
    keys = ("port", "targetPort", "nodePort")
    return {p[key] for p in ports for key in keys if isinstance(p.get(key), int)}


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """group name ('head' for the head) → pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    out.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return out


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def ray_resources(group: dict) -> dict[str, float]:
    """The custom resources a group's `rayStartParams.resources` advertises (a quoted JSON string)."""
    text = group.get("rayStartParams", {}).get("resources")
    return {} if text is None else json.loads(json.loads(text))


def peer_scope(peer: dict | None, own_labels: dict[str, str]) -> str:
    """Where a NetworkPolicy peer can be: "own" (our Ray pods), "cluster" (other pods), "anywhere".

    A rule with no `from` (peer None) and an ipBlock admit addresses outside the cluster; pod and
    namespace selectors only ever match pods, which are inside it.
    """
    if peer is None or "ipBlock" in peer:
        return "anywhere"
    labels = peer.get("podSelector", {}).get("matchLabels", {})
    if set(peer) == {"podSelector"} and labels and labels.items() <= own_labels.items():
        return "own"
    return "cluster"


def admitted_ports(policy: dict, own_labels: dict[str, str], scopes: set[str]) -> set[int] | None:
    """Ports a NetworkPolicy admits from peers whose scope is in `scopes`; None means every port."""
    ports: set[int] = set()
    for rule in policy["spec"].get("ingress", []):
        peers = rule.get("from") or [None]
        if not any(peer_scope(peer, own_labels) in scopes for peer in peers):
            continue
        if not rule.get("ports"):
            return None
        ports |= {p["port"] for p in rule["ports"]}
    return ports


PROMQL_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group",
    "count_values", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "scalar",
    "vector", "abs", "clamp_min", "clamp_max", "label_values", "label_replace", "time", "sort", "sort_desc",
    "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "inf", "nan",
})


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers left once strings, label matchers, ranges,
    grouping clauses, Grafana variables and PromQL's own words are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"label_values\(([^,()]*),[^)]*\)", r"label_values(\1)", text)
    names = set(re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)", text))
    return {n for n in names if n not in PROMQL_WORDS}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "moe-serve.json").read_text())
