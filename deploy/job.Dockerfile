# syntax=docker/dockerfile:1
# The merge-job image: Ray head and worker nodes of the merge job (KubeRay
# RayJob/RayCronJob, compose's ray-head). Ray's own image, tagged with the Ray
# version pyproject.toml pins, plus torch (CPU build by default) and fishrec.
#
#   docker build -f deploy/job.Dockerfile -t fishrec-job .           (from the repository root)
#     --build-arg FISHREC_VERSION="$(git describe --tags --always)" \
#     --build-arg FISHREC_REVISION="$(git rev-parse HEAD)"   (OCI labels, `fishrec --version`)
#   GPU nodes: --build-arg RAY_IMAGE_VARIANT=gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg JOB_LOCK=deploy/job-cu128.lock      (compiled as deploy/job.lock's header says)
#
# RAY_VERSION must equal the ray pin of deploy/constraints.txt (the tested versions, inside
# the `train` extra's ranges): the build stops otherwise.

ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_IMAGE_VARIANT}

ARG RAY_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FISHREC_VERSION=0.1.0
ARG FISHREC_REVISION=unknown
LABEL org.opencontainers.image.title="fishrec-job" \
      org.opencontainers.image.description="fishrec merge job: Ray nodes with torch and fishrec" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${FISHREC_VERSION}" \
      org.opencontainers.image.revision="${FISHREC_REVISION}"
# No git history in the build context: the package version comes from the build argument.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    SETUPTOOLS_SCM_PRETEND_VERSION=${FISHREC_VERSION}

# /app holds the configs; /artifacts is where the artifact volume is mounted
# (owned by the image's ray user, uid 1000, so that a fresh named volume is writable).
USER 0
RUN install -d -o 1000 -g 100 /app /artifacts
USER 1000:100
WORKDIR /app

# Dependencies first, from the hash-pinned lock alone (deploy/job.lock: the `train` and `s3` extras
# at the versions CI tests), so a code change rebuilds only the last layers. torch comes
# from TORCH_INDEX_URL (PyPI's Linux wheel is the CUDA build, several GB); the rest from PyPI.
# GPU nodes: a lock compiled for that index (see deploy/job.lock's header) as JOB_LOCK.
ARG JOB_LOCK=deploy/job.lock
COPY --chown=1000:100 ${JOB_LOCK} job.lock
RUN pip install --require-hashes --no-deps --extra-index-url "${TORCH_INDEX_URL}" -r job.lock \
    && python -c "import ray, sys; sys.exit(None if ray.__version__ == '${RAY_VERSION}' else f'ray {ray.__version__} installed, image built for ${RAY_VERSION}')"

COPY --chown=1000:100 training/ src/training/
COPY --chown=1000:100 merging/ src/merging/
COPY --chown=1000:100 serving/ src/serving/
COPY --chown=1000:100 pyproject.toml src/
RUN pip install --no-deps ./src && rm -rf src

# The same pipeline configs as local runs (`fishrec pipeline --config /app/configs/NAME.yaml`).
# configs/pipeline-demo.yaml is a link into the package (left out of the context): the file itself.
COPY --chown=1000:100 configs/ configs/
COPY --chown=1000:100 merging/pipeline/demo.yaml configs/pipeline-demo.yaml
