"""The HTTP API against a real uvicorn server on a loopback port: answers, fallbacks, bad input."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.schemas import BatchResponse, RecommendationResponse
from serving.settings import SCHEMA_MAX_HISTORY
from tests.serving_support import AUTH, LiveServer, publish, ready_server, server_settings
from training.run_folder import load_run_checkpoint

MAX_HISTORY = 300  # the server's request limit in this module (the model reads fewer)
MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serving_bundle: Path) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("artifacts")
    publish(root, serving_bundle, "r1")
    settings_ = server_settings(root, max_history=MAX_HISTORY, max_batch_requests=MAX_BATCH)
    with ready_server(settings_) as live:
        yield live


@pytest.fixture(scope="module")
def reference(trained_run: Path) -> Any:
    return load_run_checkpoint(trained_run).model.eval()


def wait_ready(client: httpx.Client) -> None:
    from tests.serving_support import wait_for

    wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")


def recommend(client: httpx.Client, items: list[Any], **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/recommendations", json={"items": items, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def torch_topk(
    model: Any, history: list[int], k: int, exclude_seen: bool
) -> tuple[list[int], np.ndarray]:
    """What the trained model itself ranks first (internal ids), history items excluded or not."""
    with torch.no_grad():
        logits = model.logits(torch.tensor([history]))[0]  # (N,), column j = item j + 1
    if exclude_seen:
        logits[torch.tensor(history) - 1] = float("-inf")
    scores, columns = torch.topk(logits, k)
    return (columns + 1).tolist(), scores.numpy()


# ---- answers -------------------------------------------------------------------------------


def test_answers_are_the_models_top_k(
    client: httpx.Client, vocab: list[str], reference: Any
) -> None:
    history = [5, 17, 42, 8, 99, 3]
    response = client.post(
        "/v1/recommendations", json={"items": [vocab[i - 1] for i in history], "k": 10}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"]
    body = response.json()
    assert set(body) == {
        "items",
        "model_version",
        "unknown_items",
        "unknown_filter_items",
        "fallback",
    }
    RecommendationResponse.model_validate(body)  # the documented response schema
    assert body["model_version"] == "r1"
    assert body["unknown_items"] == [] and body["fallback"] is None
    expected_ids, expected_scores = torch_topk(reference, history, 10, exclude_seen=True)
    assert [item["item_id"] for item in body["items"]] == [vocab[i - 1] for i in expected_ids]
    np.testing.assert_allclose(
        [item["score"] for item in body["items"]], expected_scores, atol=1e-4
    )


def test_unknown_items_are_ignored_and_listed(client: httpx.Client, vocab: list[str]) -> None:
    known = [vocab[0], vocab[10], vocab[20]]
    mixed = ["nope", known[0], 123456, known[1], "nope", known[2]]
    body = recommend(client, mixed, k=5)
    assert body["unknown_items"] == ["nope", "123456"]
    assert body["fallback"] is None
    assert body["items"] == recommend(client, known, k=5)["items"]


@pytest.mark.parametrize("items", [[], ["unknown-1", "unknown-2"]], ids=["empty", "all-unknown"])
def test_no_known_item_gets_the_popular_fallback(
    client: httpx.Client, serving_bundle: Path, vocab: list[str], items: list[str]
) -> None:
    popular = json.loads((serving_bundle / "popular.json").read_text())
    body = recommend(client, items, k=7)
    assert body["fallback"] == "popular"
    assert body["unknown_items"] == items
    assert [item["item_id"] for item in body["items"]] == [
        vocab[i - 1] for i in popular["items"][:7]
    ]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_over_long_history_keeps_the_newest_items(
    client: httpx.Client, serving_bundle: Path, vocab: list[str]
) -> None:
    window = json.loads((serving_bundle / "manifest.json").read_text())["max_history"]
    rng = np.random.default_rng(0)
    history = [vocab[i] for i in rng.integers(0, len(vocab), size=window + 50)]
    long = recommend(client, history, k=10, exclude_seen=False)
    newest = recommend(client, history[-window:], k=10, exclude_seen=False)
    assert [i["item_id"] for i in long["items"]] == [i["item_id"] for i in newest["items"]]
    np.testing.assert_allclose(
        [i["score"] for i in long["items"]], [i["score"] for i in newest["items"]], atol=1e-5
    )
    too_long = client.post("/v1/recommendations", json={"items": ["x"] * (MAX_HISTORY + 1)})
    assert too_long.status_code == 422
    assert f"at most {MAX_HISTORY}" in too_long.json()["message"]


def test_items_older_than_the_model_input_are_never_recommended(
    client: httpx.Client, serving_bundle: Path, vocab: list[str]
) -> None:
    # The model reads the newest `window` items; the older ones are still the user's.
    window = json.loads((serving_bundle / "manifest.json").read_text())["max_history"]
    rng = np.random.default_rng(1)
    count = min(window + 40, MAX_HISTORY, len(vocab) - 10)
    history = [vocab[i] for i in rng.choice(len(vocab), size=count, replace=False)]
    everything = len(vocab)
    for route in ("single", "batch"):
        if route == "single":
            body = recommend(client, history, k=everything)
        else:
            batch = {"requests": [{"items": history, "k": everything}]}
            response = client.post("/v1/recommendations:batch", json=batch)
            assert response.status_code == 200, response.text
            body = response.json()["results"][0]
        ids = {i["item_id"] for i in body["items"]}
        assert not ids & set(history[:-window])  # none cut from the model input
        assert not ids & set(history)
        assert len(ids) == everything - len(history)


def test_exclude_seen_on_and_off(client: httpx.Client, vocab: list[str]) -> None:
    history = [vocab[i] for i in (1, 4, 9, 16, 25, 36, 49)]
    everything = len(vocab)
    kept = recommend(client, history, k=everything, exclude_seen=False)
    assert {i["item_id"] for i in kept["items"]} == set(vocab)  # all scores finite
    excluded = recommend(client, history, k=everything)  # exclude_seen defaults to true
    ids = [i["item_id"] for i in excluded["items"]]
    assert len(ids) == everything - len(history) and not set(ids) & set(history)


def test_batch_endpoint_matches_single_requests(client: httpx.Client, vocab: list[str]) -> None:
    requests = [
        {"items": [vocab[3], vocab[7]], "k": 3},
        {"items": [], "k": 2},
        {"items": ["zzz", vocab[11]], "k": 4, "exclude_seen": False},
    ]
    response = client.post("/v1/recommendations:batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    body = response.json()
    BatchResponse.model_validate(body)  # the documented response schema
    assert body["model_version"] == "r1" and len(body["results"]) == 3
    for request, result in zip(requests, body["results"], strict=True):
        assert result == recommend(client, **request)
    assert [r["fallback"] for r in body["results"]] == [None, "popular", None]
    too_many = client.post(
        "/v1/recommendations:batch", json={"requests": [{"items": []}] * (MAX_BATCH + 1)}
    )
    assert too_many.status_code == 422 and f"at most {MAX_BATCH}" in too_many.json()["message"]


def test_operations_endpoints(server: LiveServer, client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["model_version"] == "r1"
    info = client.get("/v1/model").json()
    assert info["model_version"] == "r1" and info["model_file"] == "model.onnx"
    assert info["bundle"]["num_items"] == 200 and info["bundle"]["onnx"]["parity"]["passed"]
    recommend(client, [], k=1)
    metrics = httpx.get(f"{server.url}/metrics").text  # no API key needed
    assert 'fishrec_model_info{version="r1"} 1.0' in metrics
    assert (
        'fishrec_http_requests_total{method="POST",route="/v1/recommendations",status="200"}'
        in metrics
    )
    assert "fishrec_batch_size_bucket" in metrics and "fishrec_queue_depth" in metrics
    assert client.get("/openapi.json").json()["paths"]["/v1/recommendations:batch"]


MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def test_alert_rules_and_dashboard_name_metrics_the_service_exports(
    server: LiveServer, client: httpx.Client
) -> None:
    """deploy/monitoring: every rule parses as PromQL and reads only metrics that exist."""
    import promql_parser
    import yaml

    recommend(client, [], k=1)  # labelled series exist once a request was answered
    text = httpx.get(f"{server.url}/metrics").text
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    rules = [
        r
        for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    ]
    assert len(rules) >= 5
    for rule in rules:
        assert (
            rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        )
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions = [r["expr"] for r in rules] + queries
    for expression in expressions:
        promql_parser.parse(expression)  # raises on a syntax error
    named = set(re.findall(r"\bfishrec_\w+", " ".join(expressions)))
    assert {"fishrec_model_age_seconds", "fishrec_http_requests_total"} <= named
    assert named <= exported, f"not exported: {sorted(named - exported)}"
    # The served bundle was created by the test session: its age is minutes, not days.
    age = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("fishrec_model_age_seconds")
    )
    assert 0 <= age < 3600


# ---- bad input -----------------------------------------------------------------------------

BAD_BODIES = {
    "items not a list": {"items": "i1"},
    "item not a string or int": {"items": [["i1"]]},
    "item a float": {"items": [1.5]},
    "item a bool": {"items": [True]},
    "item empty": {"items": [""]},
    "items missing": {"k": 3},
    "items null": {"items": None},
    "k a string": {"items": [], "k": "10"},
    "k a float": {"items": [], "k": 2.5},
    "k zero": {"items": [], "k": 0},
    "k negative": {"items": [], "k": -3},
    "k over the catalogue": {"items": [], "k": 201},
    "k huge": {"items": [], "k": 10**30},
    "exclude_seen a string": {"items": [], "exclude_seen": "yes"},
    "unknown field": {"items": [], "exclude_seen": True, "exclude": False},
    "body a list": [1, 2],
    "body a string": "items",
    "history over the schema bound": {"items": ["a"] * (SCHEMA_MAX_HISTORY + 1)},
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_invalid_bodies_get_422_with_a_message(client: httpx.Client, body: Any) -> None:
    response = client.post(
        "/v1/recommendations",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    assert_error(response, 422 if len(json.dumps(body)) < 64 * 1024 else 413)


def test_non_json_bodies(client: httpx.Client) -> None:
    assert_error(
        client.post(
            "/v1/recommendations",
            content=b'{"items": [',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert_error(
        client.post(
            "/v1/recommendations", content=b"\xff\xfe", headers={"content-type": "application/json"}
        ),
        400,
    )
    assert_error(
        client.post(
            "/v1/recommendations",
            content=b"items=1",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        415,
    )
    assert_error(client.post("/v1/recommendations"), 422)  # no body at all


def test_oversize_bodies_are_refused_on_the_stream(client: httpx.Client) -> None:
    big = json.dumps({"items": ["x" * 200] * 400}).encode()  # about 80 kB, the limit is 64 kiB
    declared = client.post(
        "/v1/recommendations", content=big, headers={"content-type": "application/json"}
    )
    assert_error(declared, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    chunked = client.post(
        "/v1/recommendations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert_error(chunked, 413)
    assert "65536 bytes" in chunked.json()["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_plain_client_reads_the_413_of_a_10_mb_body(server: LiveServer, chunked: bool) -> None:
    """http.client sends all 10 MB before reading: the server must drain, not reset."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    body = b"[" + b"1," * (5 * 1024 * 1024) + b"1]"  # 10 MiB of JSON
    headers = {"Content-Type": "application/json", **AUTH}
    if chunked:
        parts = (body[i : i + 65536] for i in range(0, len(body), 65536))
        connection.request("POST", "/v1/recommendations", parts, headers, encode_chunked=True)
    else:
        connection.request("POST", "/v1/recommendations", body, headers)
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"] == "payload_too_large"
    connection.close()


def test_api_key(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        assert_error(anonymous.post("/v1/recommendations", json={"items": []}), 401)
        assert_error(anonymous.get("/v1/model"), 401)
        assert_error(anonymous.post("/v1/admin/reload"), 401)
        # The client key does not open the admin endpoints: they have their own.
        assert_error(anonymous.post("/v1/admin/reload", headers=AUTH), 401)
        wrong_admin = {**AUTH, "X-Admin-Key": "guess"}
        assert_error(anonymous.post("/v1/admin/reload", headers=wrong_admin), 403)
        wrong = anonymous.post(
            "/v1/recommendations", json={"items": []}, headers={"X-API-Key": "guess"}
        )
        assert_error(wrong, 403)
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        metrics = anonymous.get("/metrics").text  # refusals are counted under their route
        assert 'route="/v1/recommendations",status="401"' in metrics


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/recommendations"), 405)


def assert_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert (
        body["error"] and body["message"] and body["request_id"] == response.headers["x-request-id"]
    )
    assert "Traceback" not in response.text


def test_schema_fuzzing_finds_no_server_error(server: LiveServer) -> None:
    """Positive and negative cases generated from the OpenAPI schema: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    cases = st.one_of(
        schema.as_strategy(schemathesis.GenerationMode.POSITIVE, headers=AUTH),
        schema.as_strategy(schemathesis.GenerationMode.NEGATIVE, headers=AUTH),
    )

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(base_url=server.url, timeout=10)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    statuses: list[int] = []
    no_server_error()
    # The run did reach the service, with valid and invalid requests alike.
    assert len(statuses) >= 50
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
