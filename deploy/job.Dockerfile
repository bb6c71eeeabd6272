# syntax=docker/dockerfile:1
# The merge-job image: Ray head and worker nodes of the merge job (KubeRay
# RayJob/RayCronJob, compose's ray-head). Ray's own image, tagged with the Ray
# version pyproject.toml pins, plus torch (CPU build by default) and fishrec.
#
#   docker build -f deploy/job.Dockerfile -t fishrec-job .           (from the repository root)
#   GPU nodes: --build-arg RAY_IMAGE_VARIANT=gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#
# RAY_VERSION must equal the ray pin of the `train` extra: the build stops otherwise.

ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${RAY_IMAGE_VARIANT}

ARG RAY_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# /app holds the configs; /artifacts is where the artifact volume is mounted
# (owned by the image's ray user, uid 1000, so that a fresh named volume is writable).
USER 0
RUN install -d -o 1000 -g 100 /app /artifacts
USER 1000:100
WORKDIR /app

# Dependencies first, from pyproject.toml alone. torch comes from TORCH_INDEX_URL
# (PyPI's Linux wheel is the CUDA build, several GB); the rest from PyPI.
COPY --chown=1000:100 pyproject.toml deploy/requirements.py ./
RUN python requirements.py pyproject.toml train > requirements.txt \
    && grep -E '^torch([=<>!~ ;[]|$)' requirements.txt > torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r torch.txt \
    && pip install -r requirements.txt \
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
