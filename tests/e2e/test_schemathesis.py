"""schemathesis against the live server's own OpenAPI document (DESIGN.md §7).

schemathesis reads /openapi.json (with the API key: the document is behind it too), generates
valid and invalid requests for every operation from the schemas there, and checks each answer:
never a 5xx, a status code and content type the document declares for that operation, and a
body that matches the declared schema (the OpenAI error body for every error). Examples per
operation are bounded so the run takes a minute or two on two cores.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.conftest import API_KEY, Server, run_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_EXAMPLES = 25  # per operation and generation phase


@pytest.fixture(scope="module")
def server(serve_instance, demo_model_dir) -> Server:
    from gateway.app import ServeOptions

    options = ServeOptions(model_dir=str(demo_model_dir), model_name="demo", num_expert_workers=0,
                           num_cpus_per_worker=0.25, max_num_seqs=8, num_kv_blocks=256, api_key=API_KEY)
    return run_app(serve_instance, options, "schemathesis", "/")


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH, timeout=60)


def test_the_document_declares_our_errors_and_no_422(server):
    import httpx

    doc = httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=60).json()
    operations = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
    assert {(path, method) for path, method, _ in operations} >= {
        ("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
        ("/v1/models/{model_id}", "get"), ("/health", "get"), ("/ready", "get")}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, method, op in operations:
        assert "422" not in op["responses"], (path, method)
        for status, response in op["responses"].items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == error_ref, (path, method, status)
        if method == "post":
            assert {"400", "401", "413"} <= op["responses"].keys()
            assert "requestBody" in op and op["requestBody"]["required"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}


def exercise(operation, mode: GenerationMode) -> int:
    """Run one operation under hypothesis; returns how many requests were made."""
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, phases=[Phase.explicit, Phase.generate])
    def conforms(case) -> None:
        nonlocal calls
        calls += 1
        case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)

    conforms()
    return calls


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_every_operation_conforms_to_the_document(api_schema, mode):
    """Each operation under hypothesis, valid or invalid data by `mode`; failures are collected.

    (Hypothesis is driven directly: schemathesis' `from_fixture` loader does not run under
    pytest 9.)
    """
    failures, calls = {}, Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        try:
            calls[operation.label] = exercise(operation, mode)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE and operation.path in ("/health", "/ready")
            continue  # nothing to make invalid: the probes take no input
        except Exception as exc:  # schemathesis' failure (or a group of them), with the reproducing curl
            failures[operation.label] = str(exc)[:3000]
    print(dict(calls))
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    assert sum(calls.values()) >= 2 * MAX_EXAMPLES  # requests were made, not only generated
