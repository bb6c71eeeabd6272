"""Start one merge run now: a new RayJob with the spec of a template.

The template is either the suspended RayJob of the CronJob variant
(`rayjob/fishrec-merge-template`, which never runs itself) or a RayCronJob
(`raycronjob/fishrec-merge`, whose jobTemplate is used). The script

  1. reads the template,
  2. does nothing if a run started from it is still going (two merge runs never
     write the same artifact store at once),
  3. creates `<name>-<UTC time>` with the template's spec, unsuspended,
  4. deletes finished runs beyond the newest --keep.

Inside the cluster (the CronJob of deploy/k8s/components/merge-cronjob) it uses
the pod's service account; from a workstation, run `kubectl proxy` and pass
`--api http://127.0.0.1:8001 --namespace NS`. Standard library only: it runs in
a plain python image.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("submit_rayjob")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TEMPLATE_LABEL = "fishrec.io/merge-template"
FINISHED = {"Complete", "Failed"}  # RayJob status.jobDeploymentStatus of a run that is over
MAX_RAYJOB_NAME = 47  # KubeRay: 53 (RayCluster name limit) - 6 (suffix of the cluster it creates)
KINDS = {"rayjob": "rayjobs", "raycronjob": "raycronjobs"}


@dataclass(frozen=True)
class KubeApi:
    """The few calls this script makes to the Kubernetes API server."""

    server: str
    namespace: str
    token: str | None = None
    context: ssl.SSLContext | None = None

    @classmethod
    def in_cluster(cls, namespace: str | None) -> KubeApi:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT"),
        )
        if not host or not port:
            raise RuntimeError(
                "not in a pod (KUBERNETES_SERVICE_HOST unset): pass --api, e.g. kubectl proxy's"
            )
        host = f"[{host}]" if ":" in host else host
        return cls(
            server=f"https://{host}:{port}",
            namespace=namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip(),
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            context=ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt")),
        )

    def url(self, plural: str, name: str = "") -> str:
        path = f"{self.server}/apis/ray.io/v1/namespaces/{self.namespace}/{plural}"
        return f"{path}/{name}" if name else path

    def call(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(url, method=method)
        request.add_header("Accept", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(
                request, data=data, timeout=30, context=self.context
            ) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError):  # not JSON: keep the raw text
                detail = json.loads(detail).get("message", detail)
            raise RuntimeError(f"{method} {url}: HTTP {err.code}: {detail}") from None

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.call("GET", self.url(plural, name))

    def list_rayjobs(self, selector: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode({"labelSelector": selector})
        return self.call("GET", f"{self.url('rayjobs')}?{query}").get("items", [])

    def create_rayjob(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", self.url("rayjobs"), body)

    def delete_rayjob(self, name: str) -> None:
        # Background propagation: the RayCluster and submitter Job it owns go with it.
        self.call("DELETE", self.url("rayjobs", name), {"propagationPolicy": "Background"})


def parse_template(reference: str) -> tuple[str, str]:
    """`rayjob/NAME` or `raycronjob/NAME` -> (API plural, name)."""
    kind, _, name = reference.partition("/")
    if kind.lower() not in KINDS or not name:
        raise ValueError(f"--template {reference!r}: expected rayjob/NAME or raycronjob/NAME")
    return KINDS[kind.lower()], name


def template_spec(template: dict[str, Any]) -> dict[str, Any]:
    """The RayJob spec a template describes (a RayCronJob's jobTemplate, a RayJob's spec)."""
    spec = template.get("spec", {})
    if template.get("kind") == "RayCronJob":
        spec = spec.get("jobTemplate", {})
    if not spec.get("entrypoint"):
        raise ValueError(
            f"template {template.get('metadata', {}).get('name')!r} has no job entrypoint"
        )
    return spec


def run_name(template_name: str, now: datetime) -> str:
    base = re.sub(r"-template$", "", template_name)
    name = f"{base}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"
    if len(name) > MAX_RAYJOB_NAME:
        raise ValueError(f"run name {name!r} is longer than KubeRay's {MAX_RAYJOB_NAME} characters")
    return name


def new_run(template: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A RayJob manifest with the template's spec, running (not suspended), labelled as its run."""
    metadata = template["metadata"]
    spec = copy.deepcopy(template_spec(template))
    spec.pop("suspend", None)
    labels = dict(metadata.get("labels", {}))
    labels[TEMPLATE_LABEL] = metadata["name"]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": run_name(metadata["name"], now), "labels": labels},
        "spec": spec,
    }


def is_finished(run: dict[str, Any]) -> bool:
    return run.get("status", {}).get("jobDeploymentStatus") in FINISHED


def runs_to_delete(runs: list[dict[str, Any]], keep: int) -> list[str]:
    """Finished runs older than the newest `keep` finished ones (names sort by start time)."""
    finished = sorted((r["metadata"]["name"] for r in runs if is_finished(r)), reverse=True)
    return sorted(finished[keep:])


def submit(api: KubeApi, template_ref: str, keep: int, now: datetime) -> str | None:
    """Create one run from the template unless one is still going; returns its name."""
    plural, name = parse_template(template_ref)
    template = api.get(plural, name)
    runs = api.list_rayjobs(f"{TEMPLATE_LABEL}={name}")
    active = sorted(r["metadata"]["name"] for r in runs if not is_finished(r))
    if active:
        log.warning("run %s is still going: no new run this time", ", ".join(active))
        return None
    run = api.create_rayjob(new_run(template, now))
    created = run["metadata"]["name"]
    log.info("created RayJob %s/%s from %s", api.namespace, created, template_ref)
    for old in runs_to_delete(runs, keep):
        log.info("deleting finished run %s (keeping the newest %d)", old, keep)
        api.delete_rayjob(old)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--template",
        required=True,
        help="rayjob/NAME (a suspended template RayJob) or raycronjob/NAME (its jobTemplate)",
    )
    parser.add_argument(
        "--keep", type=int, default=5, help="finished runs to keep (older ones are deleted)"
    )
    parser.add_argument("--namespace", default=None, help="default: the pod's own namespace")
    parser.add_argument(
        "--api",
        default=None,
        help="API server URL without auth, e.g. kubectl proxy's http://127.0.0.1:8001",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.keep < 0:
        parser.error("--keep must be >= 0")
    try:
        if args.api:
            if not args.namespace:
                parser.error("--api needs --namespace")
            api = KubeApi(server=args.api.rstrip("/"), namespace=args.namespace)
        else:
            api = KubeApi.in_cluster(args.namespace)
        submit(api, args.template, args.keep, datetime.now(UTC))
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
