"""The container image, built and run for real with podman, and its Dockerfile linted by hadolint.

No image registry is needed: the build's base is a stand-in made from Debian bookworm packages
(mmdebstrap, then `podman import`), passed as PYTHON_IMAGE, and the dependencies come from a
directory of the wheels that the image's lock files pin (the Dockerfile's `wheels` build
context; the build checks each against the lock's hashes), so the build runs with --network
none. The image then runs the way Kubernetes runs it: read-only root, no capabilities, no new
privileges, uid 65532. The base image stays in podman's storage and the wheels under .cache/,
so a second run only rebuilds the layers that changed. Every tool is required: a missing one
fails the suite rather than skipping it (`make test` installs them).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exporter.config import DEFAULT_PORT
from exporter.models import KNOWN_STATUSES
from tests.conftest import free_port_pair, parse_exposition, require_tool

#: One image build serves the module: under pytest-xdist all of it runs on one worker.
pytestmark = pytest.mark.xdist_group("container")

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CACHE = ROOT / ".cache"
CONFIG_PATH = "/etc/catalog-upload-exporter/config.yaml"
IMAGE = "localhost/catalog-upload-exporter:test"
#: The final stage's title label (the Dockerfile's LABEL), which its layers carry too.
TITLE_LABEL = "org.opencontainers.image.title=catalog-upload-exporter"
#: The stand-in for python:3.11-slim-bookworm: Debian's own Python with venv and pip.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip")
#: Kubernetes' default terminationGracePeriodSeconds.
GRACE_SECONDS = 30
#: As the pod runs it (deploy/components/sidecar): the settings PSS "restricted" demands.
AS_KUBERNETES_RUNS_IT = (
    "--read-only",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--user=65532:65532",
    # The pod mounts an emptyDir at /tmp; podman's own tmpfs mounts are turned off.
    "--read-only-tmpfs=false",
    "--tmpfs=/tmp",
)


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run podman with runc: crun cannot set up cgroups on some hosts' layouts, runc can."""
    result = subprocess.run(
        [require_tool("podman"), "--runtime", "runc", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def base_image(scratch: Path) -> str:
    """The stand-in base, made once per recipe and kept in podman's storage."""
    recipe = ["--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE]
    tag = hashlib.sha256(" ".join(recipe).encode()).hexdigest()[:12]
    name = f"localhost/catalog-upload-exporter-test-base:{BASE_SUITE}-{tag}"
    if podman("image", "exists", name, check=False).returncode == 0:
        return name
    tarball = scratch / "base.tar"
    subprocess.run(
        [require_tool("mmdebstrap"), "--quiet", "--format=tar", *recipe, str(tarball)],
        check=True,
        timeout=900,
    )
    podman("import", str(tarball), name, timeout=300)
    tarball.unlink()
    return name


#: What the image installs: the locked dependencies and the locked build backend.
IMAGE_LOCKS = (ROOT / "requirements" / "runtime.txt", ROOT / "requirements" / "build.txt")


def wheels_dir(scratch: Path) -> Path:
    """The wheels that the image's lock files pin, for this Python, checked against their
    hashes as pip downloads them."""
    key = hashlib.sha256(
        b"".join(lock.read_bytes() for lock in IMAGE_LOCKS) + sys.version.encode()
    ).hexdigest()[:12]
    target = CACHE / f"wheels-{key}"
    if target.is_dir():
        return target
    fresh = scratch / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--require-hashes",
            "--no-deps",
            # As the Dockerfile installs them: wheels only. The project's own wheel is not
            # here: the image builds it from its sources (a copy here would go stale).
            "--only-binary=:all:",
            "--dest",
            str(fresh),
            *(f"--requirement={lock}" for lock in IMAGE_LOCKS),
        ],
        check=True,
        timeout=600,
    )
    CACHE.mkdir(exist_ok=True)
    shutil.copytree(fresh, target, dirs_exist_ok=True)
    return target


@dataclass(frozen=True, slots=True)
class Built:
    """The image under test, what it was built from, and the build's output."""

    image: str
    base: str
    wheels: Path
    log: str
    seconds: float


def build(base: str, wheels: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`podman build` of the repository with no network, from `base` and the wheels."""
    return podman(
        "build",
        "--network=none",
        f"--build-context=wheels={wheels}",
        f"--build-arg=PYTHON_IMAGE={base}",
        *options,
        str(ROOT),
        timeout=900,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The image, built with no network from the stand-in base and the wheels directory."""
    scratch = tmp_path_factory.mktemp("image")
    base = base_image(scratch)
    wheels = wheels_dir(scratch)
    started = time.monotonic()
    result = build(base, wheels, f"--tag={IMAGE}")
    # The last run's image, now untagged, and the cached layers only it used: without this,
    # every source change leaves them behind. Only untagged images nothing else
    # builds on, carrying the image's own title, are removed; the cache of this build stays.
    podman("image", "prune", "--force", f"--filter=label={TITLE_LABEL}", check=False)
    return Built(IMAGE, base, wheels, result.stdout + result.stderr, time.monotonic() - started)


def inspect(image: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    return config


def in_image(image: str, *argv: str) -> str:
    """The output of a command run in the image, as Kubernetes would run the container."""
    result = podman(
        "run", "--rm", *AS_KUBERNETES_RUNS_IT, *ULIMITS, f"--entrypoint={argv[0]}", image, *argv[1:]
    )
    return result.stdout


#: runc cannot set rlimits on some kernels without explicit ones; these are well above what the
#: exporter uses.
ULIMITS = ("--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024")


@dataclass(frozen=True, slots=True)
class Running:
    """A container of the image, serving /metrics on a loopback port of the host."""

    name: str
    url: str


@pytest.fixture
def demo(built: Built) -> Iterator[Running]:
    """`--demo` in a container, on the host's network (the demo listens on loopback)."""
    name = f"catalog-upload-exporter-test-{uuid.uuid4().hex[:8]}"
    port = free_port_pair()  # the demo's admin API takes port + 1
    podman(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        *AS_KUBERNETES_RUNS_IT,
        *ULIMITS,
        built.image,
        "--demo",
        f"--port={port}",
    )
    try:
        yield Running(name, f"http://127.0.0.1:{port}")
    finally:
        podman("rm", "--force", "--time=0", name, check=False)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until_serving(running: Running, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(f"{running.url}/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    logs = podman("logs", running.name, check=False)
    pytest.fail(f"{running.url} did not answer within {timeout} s:\n{logs.stdout}{logs.stderr}")


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    """hadolint, at its lowest threshold (info), finds nothing to say about the Dockerfile."""
    result = subprocess.run(
        [require_tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_the_default_base_is_pinned_to_a_python_patch_release_and_a_digest() -> None:
    """PYTHON_IMAGE defaults to an exact slim Python release and a sha256 digest."""
    defaults = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert len(defaults) == 1
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", defaults[0])


def installed(image: str) -> dict[str, str]:
    """Each distribution in the image's venv and its version: what `pip freeze` there would
    print (the final image has no pip), read from the same metadata."""
    listing = in_image(
        image,
        "/opt/venv/bin/python",
        "-c",
        "import importlib.metadata as m;"
        "print('\\n'.join(f'{d.name} {d.version}' for d in m.distributions()))",
    )
    return {canonical(name): version for name, version in map(str.split, listing.splitlines())}


@pytest.mark.slow
def test_the_image_is_built_offline_from_exactly_the_wheels_given(built: Built) -> None:
    """With --network none, every distribution in the venv is one of the wheels given (name
    and version), besides the exporter itself, built from the sources."""
    versions = installed(built.image)
    assert versions.pop("catalog-upload-exporter") == PYPROJECT["project"]["version"]
    given = {
        canonical(name): version
        for name, version, *_ in (wheel.name.split("-") for wheel in built.wheels.glob("*.whl"))
    }
    assert {"aiohttp", "botocore", "prometheus-client", "pyyaml", "structlog"} <= versions.keys()
    assert versions.items() <= given.items()
    print(f"\nimage build: {built.seconds:.1f} s")


#: The second build's tag; removed when the test ends.
REBUILT = "localhost/catalog-upload-exporter:test-rebuilt"
#: The dependency of which the second build's wheels also hold a newer release.
NEWER = "sortedcontainers"


def pins(lock: Path) -> dict[str, str]:
    """The name and version of each `name==version` line of a lock file."""
    return {
        canonical(match[1]): match[2]
        for match in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", lock.read_text(), re.MULTILINE)
    }


def newer_release(name: str, version: str, directory: Path) -> str:
    """A wheel of `name` at a post-release of `version` in `directory`, as an index would hold
    it the day a new release is out: it satisfies every range that `version` does."""
    release = f"{version}.post1"
    dist_info = f"{name}-{release}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {release}\n".encode()
        ),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{path},sha256="
        f"{base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
        f"{len(data)}\n"
        for path, data in files.items()
    )
    with zipfile.ZipFile(directory / f"{name}-{release}-py3-none-any.whl", "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr(f"{dist_info}/RECORD", record + f"{dist_info}/RECORD,,\n")
    return release


@pytest.mark.slow
def test_two_builds_of_one_commit_install_the_same_locked_versions(
    built: Built, tmp_path: Path
) -> None:
    """A second build of the same sources, with no cache, from wheels that also hold a newer
    release of a dependency (as an index does the day after one is out), installs the same
    distributions at the same versions as the first (each image's `pip freeze`): the versions
    requirements/runtime.txt pins."""
    locked = pins(ROOT / "requirements" / "runtime.txt")
    wheels = tmp_path / "wheels"
    shutil.copytree(built.wheels, wheels)
    newer = newer_release(NEWER, locked[NEWER], wheels)
    try:
        build(built.base, wheels, "--no-cache", f"--tag={REBUILT}")
        first, second = installed(built.image), installed(REBUILT)
    finally:
        podman("rmi", "--force", REBUILT, check=False)
    assert second == first, f"the second build installed {NEWER} {second.get(NEWER)}"
    assert first[NEWER] != newer
    assert first.pop("catalog-upload-exporter") == PYPROJECT["project"]["version"]
    assert first == {name: locked[name] for name in first}
    assert first.keys() == locked.keys()


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.slow
def test_the_image_runs_the_console_script_as_a_numeric_non_root_user(built: Built) -> None:
    """USER is uid:gid in numbers (so runAsNonRoot can check it), neither 0; the entrypoint is
    the venv's console script with --config, in exec form; the port is exposed."""
    config = inspect(built.image)
    match = re.fullmatch(r"(\d+):(\d+)", config["User"])
    assert match, f"USER {config['User']}: use numeric uid:gid"
    assert int(match[1]) != 0 and int(match[2]) != 0
    assert "catalog-upload-exporter" in PYPROJECT["project"]["scripts"]
    assert config["Entrypoint"] == ["/opt/venv/bin/catalog-upload-exporter"]
    assert config["Cmd"] == ["--config", CONFIG_PATH]
    assert set(config["ExposedPorts"]) == {f"{DEFAULT_PORT}/tcp"}
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == built.base, "the base it was built on"


@pytest.mark.slow
def test_the_final_image_has_no_pip(built: Built) -> None:
    """Neither the venv's Python nor the base's can import pip, and no pip command is on PATH."""
    probe = (
        "import importlib.util, json, shutil, sys;"
        "print(json.dumps([importlib.util.find_spec('pip') is not None,"
        " shutil.which('pip'), shutil.which('pip3'), sys.executable]))"
    )
    venv = json.loads(in_image(built.image, "/opt/venv/bin/python", "-c", probe))
    assert venv == [False, None, None, "/opt/venv/bin/python"]
    base_python = in_image(
        built.image, "/opt/venv/bin/python", "-c", "import sys; print(sys._base_executable)"
    ).strip()
    assert base_python != "/opt/venv/bin/python"
    assert json.loads(in_image(built.image, base_python, "-c", probe))[:3] == [False, None, None]


#: What the Dockerfile copies from the context: the only paths .dockerignore lets through.
CONTEXT_PATHS = (
    "pyproject.toml",
    "README.md",
    "exporter",
    "requirements/runtime.txt",
    "requirements/build.txt",
)
#: What a working copy holds besides: tooling, tests, local configs, bytecode.
CLUTTER = (
    ".git/HEAD",
    ".venv/bin/python",
    ".cache/wheels-0/x.whl",
    "tests/test_x.py",
    "deploy/kustomization.yaml",
    "bench/x.py",
    ".ci/run",
    ".pytest_cache/README.md",
    "catalog_upload_exporter.egg-info/PKG-INFO",
    "config.yaml",
    "exporter/__pycache__/cli.cpython-311.pyc",
    "exporter/stray.pyc",
    "Dockerfile",
    "requirements/test.txt",
    "requirements/dev.in",
)


@pytest.mark.slow
def test_the_build_context_holds_only_the_package_sources(built: Built, tmp_path: Path) -> None:
    """Through the real .dockerignore, a copy of the whole context (`COPY . /context` from a
    probe Containerfile) holds the package's sources and none of a working copy's clutter."""
    context = tmp_path / "context"
    for name in CONTEXT_PATHS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, context / name)
    sources = {
        path.relative_to(context).as_posix() for path in context.rglob("*") if path.is_file()
    }
    shutil.copy(ROOT / ".dockerignore", context)
    for name in CLUTTER:
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text("clutter\n", encoding="utf-8")
    probe = tmp_path / "Containerfile"
    probe.write_text(f"FROM {built.base}\nCOPY . /context\n", encoding="utf-8")
    image = podman(
        "build", "--network=none", "--quiet", f"--file={probe}", str(context)
    ).stdout.strip()
    try:
        copied = in_image(image, "find", "/context", "-type", "f").split()
    finally:
        podman("rmi", image, check=False)
    assert {path.removeprefix("/context/") for path in copied} == sources
    assert "exporter/cli.py" in sources


@pytest.mark.slow
def test_the_demo_shows_every_status_when_run_as_kubernetes_runs_it(demo: Running) -> None:
    """`--demo` in the locked-down container shows every status on /metrics within a minute."""
    wait_until_serving(demo)
    shown: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = parse_exposition(get(f"{demo.url}/metrics")[1])
        shown = {
            dict(labels)["status"]
            for (name, labels), value in samples.items()
            if name == "catalog_uploads" and value > 0
        }
        if shown >= set(KNOWN_STATUSES):
            return
        time.sleep(1)
    pytest.fail(f"the demo showed only {sorted(shown)}")


@pytest.mark.slow
def test_podman_stop_ends_the_container_cleanly_within_the_grace_period(demo: Running) -> None:
    """SIGTERM (podman stop, as the kubelet sends it) makes the exporter exit 0 before the
    grace period ends; a SIGKILL at its end would leave exit code 137."""
    wait_until_serving(demo)
    podman("stop", f"--time={GRACE_SECONDS}", demo.name, timeout=GRACE_SECONDS + 30)
    state = json.loads(podman("inspect", demo.name).stdout)[0]["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state
    assert "exporter_stopped" in podman("logs", demo.name).stdout + podman("logs", demo.name).stderr
