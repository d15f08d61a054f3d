"""The README and docs/ against the code: links resolve, metrics, keys and modules are listed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client import disable_created_metrics, enable_created_metrics
from pydantic import BaseModel

from exporter.config import Config
from exporter.simulator import demo_uploads
from tests.conftest import ExporterFactory, SimulatorFactory, fast_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Where the repository's files are published; runbook and dashboard links start with it.
PUBLISHED = "https://github.com/catalog-upload-exporter/catalog-upload-exporter/blob/main/"
#: Files whose links to the docs are checked (markdown, rules, dashboard, manifests).
LINKING_FILES = sorted(
    [
        ROOT / "README.md",
        ROOT / "DEVELOPERS.md",
        *DOCS.glob("*.md"),
        *(ROOT / "deploy").rglob("*.y*ml"),
        *(ROOT / "deploy").rglob("*.json"),
        *(ROOT / "tests" / "rules").glob("*.yml"),
    ]
)
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file (fenced code excluded):
    lower case, punctuation dropped, spaces to '-', a repeated anchor suffixed -1, -2..."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), flags=re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        unique, n = anchor, 0
        while unique in anchors:
            n += 1
            unique = f"{anchor}-{n}"
        anchors.add(unique)
    return anchors


def doc_links(path: Path) -> list[tuple[Path, str]]:
    """(target file, anchor or "") of every link in `path` to a markdown file of the project:
    published URLs anywhere, and relative markdown links in markdown files."""
    text = path.read_text()
    links = [
        (ROOT / target, anchor)
        for target, anchor in re.findall(re.escape(PUBLISHED) + r"([\w./-]+\.md)#?([\w-]*)", text)
    ]
    if path.suffix == ".md":
        for target, anchor in re.findall(r"\]\(([\w./-]*?\.md|)(?:#([\w-]+))?\)", text):
            links.append(((path.parent / target).resolve() if target else path, anchor))
    return links


def test_heading_anchors_follow_githubs_rules() -> None:
    """Backticks and colons are dropped, spaces become dashes, repeats get a number."""
    sample = DOCS / "operations.md"
    anchors = heading_anchors(sample)
    assert "the-report-command" in anchors
    assert {"budget-arithmetic", "budget-arithmetic-with-notifications"} <= anchors


def test_every_link_to_the_docs_names_an_existing_file_and_heading() -> None:
    """Runbook URLs, the dashboard's links and the docs' own cross-links resolve: a renamed
    heading or a moved file fails here."""
    checked = 0
    for path in LINKING_FILES:
        for target, anchor in doc_links(path):
            where = f"{path.relative_to(ROOT)} links to {target}#{anchor}"
            assert target.is_file(), where
            assert not anchor or anchor in heading_anchors(target), where
            checked += 1
    assert checked > 50  # the rules' runbooks alone are more: the pattern did match


def test_the_readme_is_a_front_door_that_links_every_doc() -> None:
    """The README stays short (250 lines at most) and links every file in docs/."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {target for target, _ in doc_links(ROOT / "README.md")}
    assert set(DOCS.glob("*.md")) - linked == set()


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the config, from the models."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += config_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_has_a_row_in_docs_configuration() -> None:
    """Each key of the models is in the first cell of a table row of docs/configuration.md,
    as `a.b.c` or, after another key of its section, as `/ c`."""
    documented: set[str] = set()
    for cell in re.findall(r"^\| (`[^|]+) \|", (DOCS / "configuration.md").read_text(), re.M):
        names = re.findall(r"`([\w.]+)`", cell)
        section = names[0].rpartition(".")[0]
        documented.add(names[0])
        documented.update(name if "." in name else f"{section}.{name}" for name in names[1:])
    keys = config_keys(Config)
    assert len(keys) > 40
    assert set(keys) - documented == set()
    assert documented - set(keys) == set()


def layout_names(package: Path) -> set[str]:
    """What the layout must name: each module by its path under exporter/ (`simulator/api.py`),
    a subpackage by its directory (`simulator/`), which stands for its `__init__` and `__main__`.
    """
    names = set()
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if relative.parent != Path() and relative.name in ("__init__.py", "__main__.py"):
            names.add(f"{relative.parent.as_posix()}/")
        else:
            names.add(relative.as_posix())
    return names


def test_the_developers_layout_names_every_module() -> None:
    """DEVELOPERS.md's layout list names each module in exporter/, subpackages' included."""
    guide = (ROOT / "DEVELOPERS.md").read_text()
    modules = layout_names(ROOT / "exporter")
    assert {"cli.py", "simulator/", "simulator/api.py"} <= modules
    assert {name for name in modules if f"`{name}`" not in guide} == set()


async def test_every_metric_exposed_is_in_docs_metrics_and_every_one_listed_is_exposed(
    start_simulator: SimulatorFactory, start_exporter: ExporterFactory, tmp_path: Path
) -> None:
    """The names in a running exporter's `# TYPE` lines are exactly the metrics listed in
    docs/metrics.md's table (with a web config, whose gauges exist only with one)."""
    sim, url = await start_simulator()
    sim.add_uploads(demo_uploads())
    web_config = tmp_path / "web-config.yml"
    web_config.write_text("")  # valid: plain HTTP, no authentication, its gauges exposed
    config = fast_config(url, ["demo-done-fast"], proxy={"enabled": True, "port": 0})
    running = await start_exporter(config, web_config_file=str(web_config))
    assert running.proxy_url is not None  # the proxy's metrics are on the registry too
    await wait_for(running.status_is("demo-done-fast", "INQUEUE"))
    disable_created_metrics()  # type: ignore[no-untyped-call]  # as exporter.runtime does
    try:
        status, _, body = await running.get("/metrics")
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]  # the tests' default
    assert status == 200
    exposed = set(re.findall(r"^# TYPE (\S+) ", body.decode(), flags=re.MULTILINE))
    row = r"^\| `(\w+)` \| (?:counter|gauge|histogram) \|"
    listed = set(re.findall(row, (DOCS / "metrics.md").read_text(), flags=re.MULTILINE))
    assert "catalog_upload_status" in exposed
    assert exposed - listed == set(), "exposed but not documented"
    assert listed - exposed == set(), "documented but not exposed"
