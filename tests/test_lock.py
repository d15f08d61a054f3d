"""The lock files in requirements/: what `make test`, CI and the image install, pinned with hashes.

`make lock` writes them from pyproject.toml and requirements/dev.in (DEVELOPERS.md, "The lock");
these tests catch a lock left behind by a change of pyproject.toml, an image lock that drifted
from the versions the tests run, and a venv that is not the lock's.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

#: One locked requirement: `name==version`, an optional `; marker`, then its hashes.
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?\n"
    r"(?P<hashes>(?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n?)*)",
    re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class Pin:
    name: str
    version: str
    marker: str | None
    hashes: int

    def applies_here(self) -> bool:
        """Whether pip installs this pin on this interpreter and platform."""
        return self.marker is None or Marker(self.marker).evaluate()


def pins(lock: str) -> list[Pin]:
    """Every pin of requirements/LOCK: a package may have one per Python version range (the
    lock is resolved for every Python and platform at once, --universal)."""
    text = (LOCKS / lock).read_text(encoding="utf-8")
    found = [
        Pin(
            canonicalize_name(match["name"]),
            match["version"],
            match["marker"],
            match["hashes"].count("--hash="),
        )
        for match in PIN.finditer(text)
    ]
    # Every requirement line was read: none is left out by the pattern.
    assert len(found) == len(re.findall(r"^[A-Za-z0-9]", text, re.MULTILINE)), lock
    return found


def pinned_here(lock: str) -> dict[str, str]:
    """The version requirements/LOCK installs here of each package, by canonical name."""
    applying = [pin for pin in pins(lock) if pin.applies_here()]
    versions = {pin.name: pin.version for pin in applying}
    assert len(versions) == len(applying), f"{lock} pins a package twice for this platform"
    return versions


def declared() -> dict[str, list[Requirement]]:
    """What pyproject.toml and dev.in ask for, by the lock file that must pin it."""
    dev = [
        line
        for line in (LOCKS / "dev.in").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    runtime = PYPROJECT["project"]["dependencies"]
    build = PYPROJECT["build-system"]["requires"]
    test = [*runtime, *build, *PYPROJECT["project"]["optional-dependencies"]["test"], *dev]
    return {
        "runtime.txt": [Requirement(text) for text in runtime],
        "build.txt": [Requirement(text) for text in build],
        "test.txt": [Requirement(text) for text in test],
    }


def test_every_declared_requirement_is_pinned_within_its_range_with_hashes() -> None:
    """Each requirement of pyproject.toml (dependencies, test extra, build backend) and of
    dev.in is pinned by its lock file at a version inside its range, for every Python, with at
    least one hash: a changed range or a new dependency without `make lock` fails here."""
    for lock, requirements in declared().items():
        locked = pins(lock)
        for requirement in requirements:
            versions = [
                pin.version for pin in locked if pin.name == canonicalize_name(requirement.name)
            ]
            assert versions, f"{requirement.name} is not in {lock}: run `make lock`"
            outside = [
                v for v in versions if not requirement.specifier.contains(v, prereleases=True)
            ]
            assert outside == [], (
                f"{lock} pins {requirement.name} at {outside}, outside {requirement}"
            )
        assert all(pin.hashes for pin in locked), lock


def test_the_image_locks_pin_the_versions_the_tests_run() -> None:
    """runtime.txt and build.txt, which the image installs, pin every package at the version
    test.txt pins, so the image runs what the tests ran."""
    tested = pinned_here("test.txt")
    for lock in ("runtime.txt", "build.txt"):
        image = pinned_here(lock)
        assert image == {name: tested.get(name) for name in image}, lock


def test_this_venv_holds_exactly_the_locked_versions() -> None:
    """Every package test.txt pins for this platform is installed at its pinned version (a
    venv not installed from the lock, or left behind by it, fails here)."""
    wrong = {}
    for name, version in pinned_here("test.txt").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = (version, installed)
    assert wrong == {}, "locked and installed differ (run `make .venv/.installed-test`)"
