"""The container image's recipe: the Dockerfile linted by the real hadolint, and its promises.

There is no container engine here, so the image is not built; instead the Dockerfile is parsed
and each property the deployment relies on is asserted (pinned base, non-root numeric user,
exec-form entrypoint, the port, what is copied), and `.dockerignore` is evaluated with Docker's
matching rules to prove that `docker build .` would find every file it copies. hadolint is
required: a missing one fails the suite rather than skipping it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter.config import DEFAULT_PORT
from tests.conftest import require_tool

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG_PATH = "/etc/catalog-upload-exporter/config.yaml"
#: What the build needs from the context, and nothing more.
CONTEXT_PATHS = {"pyproject.toml", "README.md", "exporter/"}


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comment lines are dropped, even inside a continuation."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        assert result, "the first instruction must be FROM (or ARG before it)"
        result[-1].append(instruction)
    return result


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage() -> list[Instruction]:
    return stages(dockerfile())[-1]


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; fails on the shell form."""
    try:
        value = json.loads(instruction.arguments)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list), f"{instruction.keyword} must use the exec (JSON) form"
    assert all(isinstance(item, str) for item in value)
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV settings of a stage, in KEY=value form."""
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                key, separator, value = pair.partition("=")
                assert separator, f"ENV {pair!r}: use the KEY=value form"
                env[key] = value
    return env


def copy_sources(instruction: Instruction) -> tuple[bool, list[str]]:
    """(whether it copies from another stage, its source paths) for a COPY."""
    words = shlex.split(instruction.arguments)
    options = [word for word in words if word.startswith("--")]
    paths = [word for word in words if not word.startswith("--")]
    assert len(paths) >= 2, f"COPY {instruction.arguments}: needs a source and a destination"
    return any(option.startswith("--from=") for option in options), paths[:-1]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, as Docker's patternmatcher compiles them."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            else:
                char = pattern[index]
                regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
                index += 1
        rules.append((negated, re.compile(regex)))
    return rules


def is_dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching rule wins, and
    a rule that matches a parent directory matches everything below it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    ignored = False
    for negated, regex in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


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


def test_every_base_image_is_pinned_to_a_patch_version_and_a_digest() -> None:
    """Each FROM names an exact Python patch release, a slim variant, and a sha256 digest."""
    stage_names: set[str] = set()
    for stage in stages(dockerfile()):
        words = stage[0].arguments.split()
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stage_names.add(words[2])
        if image in stage_names:
            continue
        assert "latest" not in image
        assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), (
            f"FROM {image}: pin the exact version and the digest"
        )


def test_a_builder_stage_makes_the_wheel_and_the_final_stage_copies_only_the_venv() -> None:
    """Two stages: the first builds a wheel into /opt/venv, the last copies just that venv."""
    all_stages = stages(dockerfile())
    assert len(all_stages) >= 2
    builder_runs = " ".join(i.arguments for i in all_stages[0] if i.keyword == "RUN")
    assert "pip wheel --no-deps" in builder_runs
    assert "/opt/venv" in builder_runs
    final = all_stages[-1]
    copies = [i for i in final if i.keyword in {"COPY", "ADD"}]
    assert [i.keyword for i in copies] == ["COPY"]
    from_stage, sources = copy_sources(copies[0])
    assert from_stage and sources == ["/opt/venv"]
    final_runs = " ".join(i.arguments for i in final if i.keyword == "RUN")
    assert "apt-get" not in final_runs, "no packages (compilers, curl) in the final image"
    assert "/usr/local/bin/pip" in final_runs, "pip is removed from the final image"
    assert "[test]" not in DOCKERFILE.read_text(encoding="utf-8"), "no test extras"


def test_the_final_stage_runs_as_a_numeric_non_root_user() -> None:
    """The last USER is uid:gid in numbers, neither 0, so runAsNonRoot can check it."""
    users = [i.arguments for i in final_stage() if i.keyword == "USER"]
    assert users, "the final stage must set USER"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]}: use numeric uid:gid"
    assert int(match[1]) != 0 and int(match[2]) != 0


def test_the_image_exposes_the_exporters_default_port() -> None:
    """EXPOSE names 10184, the exporter's default server.port."""
    exposed = [i.arguments for i in final_stage() if i.keyword == "EXPOSE"]
    assert exposed == [str(DEFAULT_PORT)]
    assert DEFAULT_PORT == 10184


def test_the_entrypoint_is_the_console_script_with_the_config_path_in_exec_form() -> None:
    """ENTRYPOINT runs the venv's console script and CMD passes --config, both as JSON arrays."""
    final = final_stage()
    entrypoints = [i for i in final if i.keyword == "ENTRYPOINT"]
    commands = [i for i in final if i.keyword == "CMD"]
    assert len(entrypoints) == 1 and len(commands) <= 1
    entrypoint = exec_form(entrypoints[0])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert "catalog-upload-exporter" in scripts
    assert entrypoint[0] == "/opt/venv/bin/catalog-upload-exporter"
    argv = entrypoint + (exec_form(commands[0]) if commands else [])
    assert argv[1:] == ["--config", CONFIG_PATH]
    # No shell at run time: no shell-form command, no curl-based health check.
    assert not [i for i in final if i.keyword == "HEALTHCHECK"]
    assert not [i for i in final if i.keyword == "SHELL"]


def test_python_runs_unbuffered_and_writes_no_bytecode() -> None:
    """The final stage sets PYTHONDONTWRITEBYTECODE and PYTHONUNBUFFERED and puts the venv first."""
    env = env_of(final_stage())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_the_image_carries_oci_labels() -> None:
    """The final stage labels the image with the OCI title, version, licence and source."""
    labels = " ".join(i.arguments for i in final_stage() if i.keyword == "LABEL")
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels


def test_only_the_package_sources_are_copied_from_the_build_context() -> None:
    """COPY takes pyproject.toml, README.md and exporter/ from the context, and nothing else."""
    copied: set[str] = set()
    for instruction in dockerfile():
        assert instruction.keyword != "ADD", "use COPY: ADD fetches URLs and unpacks archives"
        if instruction.keyword == "COPY":
            from_stage, sources = copy_sources(instruction)
            if not from_stage:
                copied.update(sources)
    assert copied == CONTEXT_PATHS


def test_dockerignore_keeps_repository_clutter_out_of_the_context() -> None:
    """.git, .venv, tests, deploy, bench, caches and bytecode are not sent to the builder."""
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/test_container.py",
        "deploy/kustomization.yaml",
        "bench/x.py",
        ".ci/run",
        ".pytest_cache/README.md",
        "catalog_upload_exporter.egg-info/PKG-INFO",
        "config.yaml",
        "exporter/__pycache__/cli.cpython-311.pyc",
        "exporter/stray.pyc",
        "Dockerfile",
    ):
        assert is_dockerignored(path), f"{path} would be sent to the builder"


def test_every_path_the_dockerfile_copies_exists_and_is_in_the_context() -> None:
    """Each COPY source exists, and neither it nor any file under it is dockerignored."""
    for source in CONTEXT_PATHS:
        path = ROOT / source
        assert path.exists(), f"{source} is missing"
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        assert files, f"{source} holds no sources"
        for file in files:
            if "__pycache__" in file.parts:
                continue
            relative = file.relative_to(ROOT).as_posix()
            assert not is_dockerignored(relative), f"{relative} is excluded by .dockerignore"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["readme"] in CONTEXT_PATHS, "the wheel build reads the readme"
