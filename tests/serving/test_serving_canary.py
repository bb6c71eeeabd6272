"""A canary rollout on a real server: the share, stickiness per user, and what /v1/model says."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving_support import LiveServer, publish, ready_server, server_settings

SHARE = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serving_bundle: Path) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("artifacts")
    publish(root, serving_bundle, "stable")
    publish(root, serving_bundle, "canary", latest=False)
    settings = server_settings(root, canary_bundle="canary", canary_share=SHARE)

    def both_loaded(client: httpx.Client) -> bool:
        info = client.get("/v1/model")
        return info.status_code == 200 and info.json()["canary"] is not None

    with ready_server(settings, both_loaded) as live:
        yield live


@pytest.fixture(scope="module")
def history(serving_bundle: Path) -> list[str]:
    return json.loads((serving_bundle / "vocab.json").read_text())["items"][:3]


def version(client: httpx.Client, body: dict, headers: dict | None = None) -> str:
    response = client.post("/v1/recommendations", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_the_canary_answers_its_share(client: httpx.Client, history: list[str]) -> None:
    counts = Counter(version(client, {"items": history}) for _ in range(2000))
    assert set(counts) == {"stable", "canary"}
    assert abs(counts["canary"] / 2000 - SHARE) < 0.04  # > 4 binomial standard deviations
    metrics = client.get("/metrics").text
    assert 'fishrec_answers_total{version="canary"}' in metrics


def test_a_user_stays_on_one_side(client: httpx.Client, history: list[str]) -> None:
    sides = {}
    for user in range(400):
        seen = {version(client, {"items": history, "user_id": f"u{user}"}) for _ in range(3)}
        assert len(seen) == 1, f"user u{user} saw {seen}"
        sides[user] = seen.pop()
    share = sum(side == "canary" for side in sides.values()) / len(sides)
    assert abs(share - SHARE) < 0.07
    # The header routes like the field.
    for user in range(20):
        by_header = version(client, {"items": history}, {"X-User-Id": f"u{user}"})
        assert by_header == sides[user]


def test_model_info_lists_both(client: httpx.Client) -> None:
    info = client.get("/v1/model").json()
    assert info["model_version"] == "stable"
    assert info["canary"]["model_version"] == "canary" and info["canary"]["share"] == SHARE
