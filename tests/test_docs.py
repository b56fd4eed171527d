"""The documentation: docs/configuration.md is what its generator writes, README.md stays a front
page, and every relative link in README.md and docs/*.md leads to a file. Fast: no Ray."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated():
    expected = _generator().render()
    current = (DOCS / "configuration.md").read_text(encoding="utf-8") if (DOCS / "configuration.md").exists() else ""
    assert current == expected, "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details into docs/")


def _relative_links(text: str) -> list[str]:
    """Link targets outside code, less external ones and pure anchors, without their `#anchor`."""
    text = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto:, ... or an anchor in the same file
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_point_to_files():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        for target in _relative_links(page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_reader():
    text = ("[a](docs/x.md#part) ![b](img.png \"title\") [c](https://example.com) [d](#here)\n"
            "`[e](in-code.md)`\n```\n[f](in-fence.md)\n```\n")
    assert _relative_links(text) == ["docs/x.md", "img.png"]
