"""The documentation holds together: every relative link of README.md, docs/*.md and
k8s/README.md points to a file of this repository, every `#anchor` to a heading of the page
it names (GitHub's slugs), the README links every page of docs/, and the README's quick start
gives the source agent settings it accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from agent.config import SETTINGS_BY_ENV, parse_source

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "k8s" / "README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def prose(text: str) -> str:
    """The text of a Markdown page without its fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (link targets and code marks dropped), lower
    case, every character that is not a letter, digit, `_`, `-` or space removed, spaces to
    `-`. `slug("Push mode (step 2): `source push`")` is `push-mode-step-2-source-push`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of `page`, a repeated one numbered as GitHub does (`x`, `x-1`)."""
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The link targets of `page` outside code: inline links and reference definitions."""
    text = CODE_SPAN.sub("", prose(page.read_text()))
    return INLINE_LINK.findall(text) + REFERENCE.findall(text)


def test_the_slug_rules_are_githubs():
    assert (
        slug("Push mode (step 2 on the source): `source push`, `source run`")
        == "push-mode-step-2-on-the-source-source-push-source-run"
    )
    assert slug("`list --json`: the fields") == "list---json-the-fields"
    assert (
        slug("How the application is stopped: `QUIESCE_MODE`")
        == "how-the-application-is-stopped-quiesce_mode"
    )
    assert (
        slug("Checking files by hand against MANIFEST.json")
        == "checking-files-by-hand-against-manifestjson"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_relative_to(ROOT) or not linked.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(
                f"{target}: no heading with the anchor #{anchor} in {linked.relative_to(ROOT)}"
            )
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in links(ROOT / "README.md")
        if not EXTERNAL.match(target)
    }
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no docs page {missing}: add it to its documentation list"


def test_the_readme_quick_start_gives_the_source_agent_settings_it_accepts():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```yaml\n(.*?)^```", section, re.M | re.S)
    services = yaml.safe_load(block)["services"]
    agent = services["source-agent"]
    env = {
        name.removesuffix("_FILE") if name.endswith("_FILE") else name: str(value)
        for name, value in agent["environment"].items()
    }
    assert set(env) <= set(SETTINGS_BY_ENV)
    cfg = parse_source(env)  # raises ConfigError naming every invalid setting
    mounted = {volume.split(":")[1] for volume in agent["volumes"]}
    assert {str(path) for path in cfg.data_paths} <= mounted
    assert any(str(cfg.handover_dir).startswith(m + "/") for m in mounted)
    key, _, value = cfg.stop_label.docker_filter().partition("=")
    assert any(str(s.get("labels", {}).get(key)) == value for s in services.values())
