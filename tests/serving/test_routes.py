"""The router: what the app includes, route labels."""

from __future__ import annotations

from pathlib import Path

import httpx

from serving.routes import router
from tests.serving_support import AUTH, LiveServer, server_settings

HOT = {"/v1/recommendations", "/v1/recommendations:batch", "/v1/similar-items"}


def test_the_recommendation_routes_are_posts_of_the_router() -> None:
    posts = {route.path for route in router.routes if "POST" in getattr(route, "methods", ())}
    assert posts >= HOT


def test_requests_are_counted_by_route_template_and_unknown_paths_by_one_label(
    tmp_path: Path,
) -> None:
    # No bundle is needed: /healthz answers at once, /v1/model says 503 (loading).
    with (
        LiveServer(server_settings(tmp_path)) as live,
        httpx.Client(base_url=live.url, headers=AUTH) as client,
    ):
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/model").status_code == 503
        for n in range(3):
            assert client.get(f"/no/such/path/{n}").status_code == 404
        # Refused by the middleware before routing: labelled by the route it asked for.
        assert httpx.get(f"{live.url}/v1/model").status_code == 401
        text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("fishrec_http_requests_total")]
    assert any('route="/healthz"' in line and 'status="200"' in line for line in lines), lines
    assert any('route="/v1/model"' in line and 'status="503"' in line for line in lines), lines
    assert any('route="/v1/model"' in line and 'status="401"' in line for line in lines), lines
    unmatched = [line for line in lines if 'route="unmatched"' in line]
    assert len(unmatched) == 1 and unmatched[0].endswith(" 3.0"), lines
    assert not any("/no/such/path" in line for line in lines)
