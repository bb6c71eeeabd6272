# syntax=docker/dockerfile:1
# The fishrec HTTP service: FastAPI on onnxruntime. Only the `serve` extra is
# installed: no torch, no ray. The model bundle is read from a mounted volume.
#
#   docker build -f deploy/serving.Dockerfile -t fishrec-serve .      (from the repository root)
#     --build-arg FISHREC_VERSION="$(git describe --tags --always)" \
#     --build-arg FISHREC_REVISION="$(git rev-parse HEAD)"   (OCI labels, `fishrec --version`)
#   docker run -p 8000:8000 -v "$PWD/artifacts:/artifacts:ro" fishrec-serve
#   bucket instead of a volume: --build-arg SERVING_LOCK=deploy/serving-s3.lock, then run with
#     -e FISHREC_SOURCE=s3://bucket/fishrec -e AWS_... (FISHREC_ARTIFACTS becomes the local cache)
#
# The command is `fishrec serve`; its settings are FISHREC_* environment variables
# (serving/settings.py, deploy/README.md): FISHREC_ARTIFACTS, FISHREC_HOST and
# FISHREC_PORT are set below. The CPU budget is FISHREC_CPUS; unset, the service
# derives it from the container's CPU quota (cgroup), not from the host's core
# count. Kubernetes sets it from limits.cpu. onnxruntime gets the budget less one
# core for the event loop (FISHREC_INTRA_OP_THREADS overrides).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG FISHREC_VERSION=0.1.0
ARG FISHREC_REVISION=unknown

# ---- build: a virtual environment with the dependencies, then the package ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
ARG FISHREC_VERSION
RUN python -m venv /opt/venv
# No git history in the build context: the version comes from the build argument.
ENV PATH=/opt/venv/bin:$PATH \
    SETUPTOOLS_SCM_PRETEND_VERSION=${FISHREC_VERSION}
WORKDIR /src

# Dependencies first, from the hash-pinned lock (deploy/serving.lock, compiled from
# pyproject.toml's serve extra): two builds install the same bytes, and a code change
# does not reinstall them. A service that follows a bucket (FISHREC_SOURCE=s3://...)
# needs the s3 extra too: --build-arg SERVING_LOCK=deploy/serving-s3.lock.
ARG SERVING_LOCK=deploy/serving.lock
COPY ${SERVING_LOCK} serving.lock
RUN pip install --require-hashes --no-deps -r serving.lock

# The package itself (the `fishrec` command registers every subcommand without importing torch).
COPY training/ training/
COPY merging/ merging/
COPY serving/ serving/
# Then: refuse an environment where torch or ray slipped in, and drop the
# installers (~25 MB the service never uses).
RUN pip install --no-deps . \
    && python -c "import importlib.util as u, sys; heavy = [m for m in ('torch', 'ray') if u.find_spec(m)]; sys.exit(f'serving image must not contain {heavy}' if heavy else 0)" \
    && python -m pip uninstall --yes --quiet pip setuptools

# ---- runtime: the virtual environment only, run as an unprivileged user ----
FROM ${PYTHON_IMAGE} AS runtime
ARG FISHREC_VERSION
ARG FISHREC_REVISION
LABEL org.opencontainers.image.title="fishrec-serve" \
      org.opencontainers.image.version="${FISHREC_VERSION}" \
      org.opencontainers.image.revision="${FISHREC_REVISION}" \
      org.opencontainers.image.description="fishrec recommendations over HTTP (onnxruntime, no torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fishrec \
    && useradd --system --uid 10001 --gid fishrec --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin fishrec
COPY --from=build /opt/venv /opt/venv
# Where the service looks and listens: FISHREC_* settings, so that a deployment
# changes them without touching the command (command-line flags would win over them).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FISHREC_ARTIFACTS=/artifacts \
    FISHREC_HOST=0.0.0.0 \
    FISHREC_PORT=8000
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ['FISHREC_PORT'], timeout=2)"]
ENTRYPOINT ["fishrec"]
CMD ["serve"]
