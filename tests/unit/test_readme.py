"""The README is the front door; docs/ holds the reference. Between them, everything an operator can set,
see or be refused with is documented, and every link between them resolves."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from medserve.errors import MedserveError
from medserve.metrics import all_metrics
from medserve.reference_docs import error_classes
from medserve.settings import Settings

README_MAX_BYTES = 30 * 1024
QUICKSTART_LINES = 40
# [text](target): a Markdown link; images and bare URLs are not links to check.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _docs(repo_root: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted((repo_root / "docs").glob("*.md"))}


def _documented(repo_root: Path) -> str:
    """Everything a reader can find: the README, docs/ and the monitoring README."""
    parts = [(repo_root / "README.md").read_text(), (repo_root / "monitoring" / "README.md").read_text()]
    return "\n".join(parts + list(_docs(repo_root).values()))


# --- the front door ----------------------------------------------------------------


def test_readme_is_a_front_door_not_the_reference(repo_root):
    size = (repo_root / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move reference material into docs/ and link it"
    )


def test_quickstart_commands_are_on_the_first_screen(repo_root):
    first = (repo_root / "README.md").read_text().splitlines()[:QUICKSTART_LINES]
    commands = [line.split("#")[0].strip() for line in first]
    assert "make up" in commands, f"`make up` must start a line within the README's first {QUICKSTART_LINES} lines"
    assert "make test" in commands, f"`make test` must start a line within the README's first {QUICKSTART_LINES} lines"


def test_every_docs_page_is_linked_from_the_readme(repo_root):
    readme = (repo_root / "README.md").read_text()
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    assert [name for name in _docs(repo_root) if f"docs/{name}" not in linked] == []


def test_every_docs_page_says_which_source_room_it_documents(repo_root):
    for name, text in _docs(repo_root).items():
        first = text.splitlines()[0]
        assert first.startswith("Documents "), f"docs/{name} must start with 'Documents <source room>'"
        paths = re.findall(r"`([\w./-]+/[\w./-]*)`", first)
        assert paths, f"docs/{name}: its first line names no path"
        assert [p for p in paths if not (repo_root / p).exists()] == [], f"docs/{name} names a path that is gone"


# --- links -------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    anchors, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_relative_links_in_readme_and_docs_resolve(repo_root):
    pages = [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md")), repo_root / "monitoring/README.md"]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(repo_root)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.relative_to(repo_root)}: {target} (no such heading)")
    assert broken == []


# --- everything is documented somewhere --------------------------------------------


def test_every_setting_is_documented(repo_root):
    settings_page = (repo_root / "docs" / "settings.md").read_text()
    prefix = Settings.model_config["env_prefix"]
    missing = [f"{prefix}{name}".upper() for name in Settings.model_fields
               if f"`{prefix}{name}`".upper() not in settings_page.upper()]
    assert missing == [], "settings missing from docs/settings.md (run make docs)"


def test_every_error_code_is_documented(repo_root):
    page = (repo_root / "docs" / "error-codes.md").read_text()
    classes = error_classes()
    assert MedserveError in classes and len(classes) > 20
    assert [cls.code for cls in classes if f"`{cls.code}`" not in page] == []


def test_every_metric_is_documented(repo_root):
    page = (repo_root / "docs" / "metrics.md").read_text()
    assert [m.exported_name for m in all_metrics() if f"`{m.exported_name}`" not in page] == []


def test_every_alert_is_documented(repo_root):
    documented = _documented(repo_root)
    alerts = [
        rule["alert"]
        for path in sorted((repo_root / "monitoring/prometheus").glob("*rules*.yaml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert alerts
    assert [name for name in alerts if f"`{name}`" not in documented] == []


def test_statements_about_fakes_stay_in_the_readme(repo_root):
    """What runs only against a stand-in is said on the front door, not only deep in docs/."""
    readme = " ".join((repo_root / "README.md").read_text().split())
    assert "fake API server" in readme
    assert "never run against a real cluster" in readme
