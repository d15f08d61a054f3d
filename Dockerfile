# syntax=docker/dockerfile:1
#
# The catalog-upload-exporter image: a wheel built in one stage, installed with its dependencies
# into /opt/venv, and only that venv copied onto a clean Python base.
#
#   make image            # or: docker build -t catalog-upload-exporter:0.1.0 .
#   docker run --rm -p 10184:10184 \
#     -v "$PWD/config.yaml:/etc/catalog-upload-exporter/config.yaml:ro" \
#     catalog-upload-exporter:0.1.0
#
# The base is pinned by tag and by the digest of its multi-arch index, so a rebuild gets the same
# bytes, and so is every dependency, by requirements/runtime.txt with its hashes (make lock). The
# digest is the one docker-library/repo-info recorded for python:3.11.16-slim-bookworm
# (repos/python/remote/3.11.16-slim-bookworm.md). To move to a newer base, read the new digest
# with `docker buildx imagetools inspect python:3.11.X-slim-bookworm` (the "Digest:" line) or
# `crane digest python:3.11.X-slim-bookworm`, and change PYTHON_IMAGE (the base.name label
# follows it).
# Any image with python3, its venv module and pip on PATH works as a base (--build-arg
# PYTHON_IMAGE=...): tests/test_container.py builds on one made from Debian packages.
#
# Offline: `--build-context wheels=DIR`, DIR holding the wheels that requirements/runtime.txt and
# requirements/build.txt pin, installs from DIR alone (docs/deploying.md says how to fill it).

ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f

# Empty unless the build names a context "wheels", which replaces this stage.
FROM scratch AS wheels


FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src

# The dependencies first, in a layer of their own that only a change of the lock rebuilds: the
# venv has no pip of its own (the base image's pip installs into it, --python), so the venv
# copied to the final stage holds the exporter and its dependencies and nothing to install with.
# Every package is a pin of requirements/ with its hashes (--require-hashes: a file whose hash
# is not in the lock is refused, from an index or from the wheels alike), so two builds of one
# commit install the same files. Wheels only (every dependency ships manylinux wheels): no
# compiler, and no source build fetching build dependencies that nothing pins. The build
# backend (setuptools, requirements/build.txt) goes into a venv of its own that the final
# stage leaves behind. With wheels given, pip reads no index at all (PIP_NO_INDEX).
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels)" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi \
    && python3 -m venv --without-pip /opt/venv \
    && python3 -m pip --python /opt/venv/bin/python install --require-hashes --no-deps \
        --only-binary=:all: --compile -r requirements/runtime.txt \
    && python3 -m venv --without-pip /build \
    && python3 -m pip --python /build/bin/python install --require-hashes --no-deps \
        --only-binary=:all: -r requirements/build.txt

# The exporter's own wheel, built with the locked setuptools (no build isolation, so nothing is
# fetched) and installed without its dependencies, which are in place already.
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN python3 -m pip --python /build/bin/python wheel --no-build-isolation --no-deps \
        --wheel-dir /dist . \
    && python3 -m pip --python /opt/venv/bin/python install --no-deps --compile /dist/*.whl


FROM ${PYTHON_IMAGE}

# The base this image was built on, whichever it is (the default above or --build-arg).
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="catalog-upload-exporter" \
      org.opencontainers.image.description="Prometheus exporter for HAQM Catalog API upload status" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/catalog-upload-exporter/catalog-upload-exporter" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# The venv does not see the system site-packages, so pip, setuptools and wheel there are only
# tools for changing the image at run time: remove every site directory, ensurepip, and the pip
# scripts beside python3 (asked of python3 itself, so any base's layout is covered).
RUN python3 -c "import glob, os, shutil, site, sys, sysconfig; \
[shutil.rmtree(d, ignore_errors=True) for d in [*site.getsitepackages(), os.path.join(sysconfig.get_path('stdlib'), 'ensurepip')]]; \
[os.remove(p) for p in glob.glob(os.path.join(os.path.dirname(sys.executable), 'pip*'))]"

COPY --from=builder /opt/venv /opt/venv

# No .pyc written at run time: the root filesystem is read-only in Kubernetes, and pip already
# compiled the venv. Unbuffered, so each JSON log line reaches the container log at once.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A numeric non-root user (distroless' "nonroot"), so runAsNonRoot can verify it without
# /etc/passwd; the venv stays owned by root and read-only to the process.
USER 65532:65532
EXPOSE 10184

ENTRYPOINT ["/opt/venv/bin/catalog-upload-exporter"]
CMD ["--config", "/etc/catalog-upload-exporter/config.yaml"]
