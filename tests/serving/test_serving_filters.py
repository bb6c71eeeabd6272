"""Business rules at serving time against a real server: exclude_items, candidates, availability."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from serving.bundle import Bundle, Vocab
from serving.recommend import LimitExceeded, check_limits
from serving.schemas import RecommendationRequest
from tests.serving_support import (
    AUTH,
    LiveServer,
    publish,
    ready_server,
    server_settings,
    wait_for,
)
from training.run_folder import load_run_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, serving_bundle: Path) -> Path:
    folder = tmp_path_factory.mktemp("artifacts")
    publish(folder, serving_bundle, "f1")
    return folder


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[LiveServer]:
    settings = server_settings(root, max_exclude_items=50, max_candidates=300)
    with ready_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def logits_of(trained_run: Path) -> Any:
    model = load_run_checkpoint(trained_run).model.eval()

    def logits(history: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model.logits(torch.tensor([history]))[0].numpy().copy()

    return logits


def reference(
    scores: np.ndarray, k: int, banned: set[int], candidates: set[int] | None
) -> list[int]:
    """Top-k internal ids of the model's scores under the same rules, in numpy."""
    eligible = [
        i
        for i in range(1, len(scores) + 1)
        if i not in banned and (candidates is None or i in candidates)
    ]
    eligible.sort(key=lambda i: -scores[i - 1])
    return eligible[:k]


def post(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_exclusions_and_candidates_match_a_numpy_reference(
    client: httpx.Client, vocab: list[str], logits_of: Any
) -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        history = rng.integers(1, len(vocab) + 1, size=int(rng.integers(1, 15))).tolist()
        excluded = rng.integers(1, len(vocab) + 1, size=20).tolist()
        # Candidates: sometimes fewer eligible than k, sometimes many; None on a third.
        size = [5, 40, 200][trial % 3]
        candidates = rng.integers(1, len(vocab) + 1, size=size).tolist() if trial % 4 else None
        k = 10
        body: dict[str, Any] = {
            "items": [vocab[i - 1] for i in history],
            "k": k,
            "exclude_items": [vocab[i - 1] for i in excluded] + ["no-such-item"],
        }
        if candidates is not None:
            body["candidates"] = [vocab[i - 1] for i in candidates] + ["nor-this"]
        answer = post(client, body)
        expected = reference(
            logits_of(history), k, set(history) | set(excluded), set(candidates or []) or None
        )
        got = [vocab.index(item["item_id"]) + 1 for item in answer["items"]]
        assert got == expected, f"trial {trial}"
        eligible = len(
            reference(
                logits_of(history),
                10**6,
                set(history) | set(excluded),
                set(candidates or []) or None,
            )
        )
        assert len(got) == min(k, eligible)  # k whenever k eligible items exist
        assert "no-such-item" in answer["unknown_filter_items"]
        assert ("nor-this" in answer["unknown_filter_items"]) == (candidates is not None)
        assert answer["unknown_items"] == []


def test_no_known_candidate_means_an_empty_answer(client: httpx.Client, vocab: list[str]) -> None:
    answer = post(client, {"items": [vocab[3]], "candidates": ["x1", "x2"]})
    assert answer["items"] == [] and answer["fallback"] is None
    assert answer["unknown_filter_items"] == ["x1", "x2"]


def test_the_popular_fallback_obeys_the_rules(
    client: httpx.Client, vocab: list[str], serving_bundle: Path
) -> None:
    popular = json.loads((serving_bundle / "popular.json").read_text())["items"]
    top = [vocab[i - 1] for i in popular[:10]]
    answer = post(client, {"items": ["unknown"], "k": 5, "exclude_items": top[:2]})
    assert answer["fallback"] == "popular"
    assert [i["item_id"] for i in answer["items"]] == top[2:7]
    answer = post(client, {"items": [], "k": 5, "candidates": top[5:8] + top[:1]})
    assert [i["item_id"] for i in answer["items"]] == [top[0], *top[5:8]]


def test_batch_requests_apply_each_entrys_rules(client: httpx.Client, vocab: list[str]) -> None:
    body = {
        "requests": [
            {"items": [vocab[0]], "k": 3, "candidates": vocab[10:13]},
            {"items": [vocab[0]], "k": 3, "exclude_items": vocab[:50]},
            {"items": [vocab[0]], "k": 3},
        ]
    }
    response = client.post("/v1/recommendations:batch", json=body)
    assert response.status_code == 200, response.text
    first, second, third = (r["items"] for r in response.json()["results"])
    assert {i["item_id"] for i in first} == set(vocab[10:13])
    assert not {i["item_id"] for i in second} & set(vocab[:50])
    assert len(third) == 3


def test_filter_limits_are_422_with_the_field(client: httpx.Client, vocab: list[str]) -> None:
    response = client.post(
        "/v1/recommendations", json={"items": [vocab[0]], "exclude_items": vocab[:51]}
    )
    assert response.status_code == 422
    assert response.json()["details"][0]["loc"] == ["body", "exclude_items"]
    body = {"requests": [{"items": [vocab[0]], "candidates": ["1"] * 301}]}
    response = client.post("/v1/recommendations:batch", json=body)
    assert response.status_code == 422
    assert response.json()["details"][0]["loc"] == ["body", "requests", "0", "candidates"]
    wrong = client.post("/v1/recommendations", json={"items": [], "candidates": "a,b"})
    assert wrong.status_code == 422


def test_a_bundle_without_filter_inputs_refuses_filters_clearly() -> None:
    vocab = Vocab(("a", "b"))
    old = Bundle(
        Path("."),
        "old",
        {"onnx": {"inputs": [{"name": "item_ids"}]}},
        vocab,
        np.array([1, 2]),
        np.array([0.5, 0.5], np.float32),
    )
    request = RecommendationRequest(items=["a"], k=1, exclude_items=["b"])
    with pytest.raises(LimitExceeded, match="exported before per-request filters"):
        check_limits(request, server_settings(Path(".")), old, [])
    check_limits(RecommendationRequest(items=["a"], k=1), server_settings(Path(".")), old, [])


# ---- availability ------------------------------------------------------------------------------


def write_atomically(path: Path, text: str | bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(temporary, path)


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_unavailable_items_disappear_within_a_reload_interval_under_load(
    client: httpx.Client, server: LiveServer, root: Path, vocab: list[str]
) -> None:
    history = [vocab[0], vocab[5]]
    first = [i["item_id"] for i in post(client, {"items": history, "k": 5})["items"]]
    unavailable = root / "unavailable.txt"
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:  # concurrent clients while the list changes: no request may fail
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http:
            while not stop.is_set():
                response = http.post("/v1/recommendations", json={"items": history, "k": 5})
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        write_atomically(unavailable, "# out of stock\n" + "\n".join(first[:3]) + "\nghost\n")

        def held_back() -> bool:
            answer = post(client, {"items": history, "k": 5})
            return not {i["item_id"] for i in answer["items"]} & set(first[:3])

        wait_for(held_back, timeout=5, what="the unavailable items to disappear")
        assert metric(client, "fishrec_unavailable_items") == 4
        fallback = post(client, {"items": ["unknown"], "k": 20})
        assert not {i["item_id"] for i in fallback["items"]} & set(first[:3])
        # A broken file is refused: the previous list stays in force, the failure is counted.
        refused = 'fishrec_availability_reloads_total{result="failure"}'
        assert refused not in client.get("/metrics").text
        write_atomically(unavailable, b"\xff\xfe not text")
        wait_for(
            lambda: refused in client.get("/metrics").text, timeout=5, what="a counted refusal"
        )
        assert held_back()
        unavailable.unlink()
        wait_for(lambda: not held_back(), timeout=5, what="the items to come back")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []


# ---- similar items -------------------------------------------------------------------------------


def test_similar_items_match_a_numpy_cosine_reference(
    client: httpx.Client, vocab: list[str], trained_run: Path
) -> None:
    with torch.no_grad():
        weights = load_run_checkpoint(trained_run).model.output_weight().numpy()
    unit = weights / np.linalg.norm(weights, axis=1, keepdims=True)
    rng = np.random.default_rng(1)
    for item in rng.integers(1, len(vocab) + 1, size=8).tolist():
        cosine = unit @ unit[item - 1]
        excluded = rng.integers(1, len(vocab) + 1, size=5).tolist()
        candidates = rng.integers(1, len(vocab) + 1, size=60).tolist() if item % 2 else None
        body: dict[str, Any] = {
            "item_id": vocab[item - 1],
            "k": 10,
            "exclude_items": [vocab[i - 1] for i in excluded],
        }
        if candidates is not None:
            body["candidates"] = [vocab[i - 1] for i in candidates]
        response = client.post("/v1/similar-items", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        got = [vocab.index(entry["item_id"]) + 1 for entry in answer["items"]]
        eligible = [
            i
            for i in range(1, len(vocab) + 1)
            if i != item and i not in excluded and (candidates is None or i in candidates)
        ]
        expected = sorted(eligible, key=lambda i: -cosine[i - 1])[:10]
        assert got == expected
        scores = [entry["score"] for entry in answer["items"]]
        np.testing.assert_allclose(scores, cosine[np.array(expected) - 1], atol=1e-5)


def test_similar_items_errors(client: httpx.Client, vocab: list[str]) -> None:
    missing = client.post("/v1/similar-items", json={"item_id": "no-such-item"})
    assert missing.status_code == 404 and missing.json()["error"] == "item_not_found"
    too_many = client.post(
        "/v1/similar-items", json={"item_id": vocab[0], "exclude_items": vocab[:51]}
    )
    assert too_many.status_code == 422
    assert client.post("/v1/similar-items", json={"item_id": vocab[0], "k": 0}).status_code == 422
