"""The user docs hold together: every relative link in README.md and docs/*.md resolves (the file, and the
heading an #anchor names), and every flag that `autoprec COMMAND --help` prints is in docs/cli.md, in that
command's section."""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CLI_PAGE = DOCS / "cli.md"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where link syntax is not a link."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _LINK.findall(prose) + _REFERENCE.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for _, heading in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_the_docs_exist():
    assert (REPO / "README.md").is_file() and CLI_PAGE.is_file()
    assert len(PAGES) > 2, "docs/ holds no pages"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in _links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...: not ours to check
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if REPO not in resolved.parents and resolved != REPO:
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{target}: an anchor into a file that is not Markdown")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n  " + "\n  ".join(broken)


def _parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings `--help` prints (suppressed options are not printed)."""
    return {flag for action in parser._actions if action.help != argparse.SUPPRESS
            for flag in action.option_strings}


def _help_flags(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "autoprec", *args, "--help"], capture_output=True, text=True,
                          check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout


@functools.lru_cache(maxsize=None)
def _command_flags() -> dict[str, frozenset[str]]:
    """Each subcommand of `autoprec` and the flags its --help prints: from autoprec.cli's parser builder,
    else (should it be renamed) from `python -m autoprec COMMAND --help` itself."""
    import autoprec.cli as cli

    build = getattr(cli, "build_parser", None)
    if build is not None:
        found: dict[str, frozenset[str]] = {}
        for action in build()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found.setdefault(name, frozenset(_parser_flags(sub)))
        return found
    usage = _help_flags()
    names = re.search(r"\{([a-z,-]+)\}", usage)
    listed = names.group(1).split(",") if names else re.findall(r"^ {4}([a-z][a-z-]*)\s", usage, re.M)
    return {name: frozenset(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", _help_flags(name).split("options:")[-1]))
            for name in listed}


def _cli_sections() -> dict[str, str]:
    """docs/cli.md's second-level sections, by the `autoprec COMMAND` their heading names."""
    text = CLI_PAGE.read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        match = re.search(r"autoprec\s+([a-z][a-z-]*)", heading)
        if match:
            sections[match.group(1)] = body
    return sections


def test_every_command_is_documented():
    commands = _command_flags()
    assert commands, "no subcommands found on the autoprec command"
    missing = sorted(set(commands) - set(_cli_sections()))
    assert not missing, f"docs/cli.md has no `## autoprec COMMAND` section for: {', '.join(missing)}"


@pytest.mark.parametrize("command", sorted(_command_flags()))
def test_every_flag_is_documented(command: str):
    body = _cli_sections().get(command)
    if body is None:
        pytest.fail(f"docs/cli.md has no section for `autoprec {command}`")
    missing = [flag for flag in sorted(_command_flags()[command])
               if flag not in ("-h", "--help")
               and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", body)]
    assert not missing, f"docs/cli.md, `autoprec {command}`: flags not documented: {', '.join(missing)}"


def test_help_flag_is_documented():
    text = CLI_PAGE.read_text(encoding="utf-8")
    assert "--help" in text and re.search(r"(?<![\w-])-h(?![\w-])", text)
