"""The README and docs/ stay true to the repository: every relative link reaches a file (and its heading, for an
anchor), every `kdcache` command shown names a real command and real options, every `make` target shown exists,
every pipeline file shown exists, and every pipeline YAML shown is a valid FineTuneConfig."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml
from helpers import REPO

from kdcache.cli import main
from kdcache.config import FineTuneConfig

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _prose(text: str) -> str:
    """The text outside code: no fenced blocks, no indented (code or output) lines, no inline code spans."""
    text = FENCE.sub("", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`\n]*`", "code", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces as '-', repeats numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            seen.setdefault(f"{slug}-{n}", 1) if n else None
    return set(seen)


def _links(page: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text()))


def test_the_link_checker_sees_links_and_anchors():
    readme = REPO / "README.md"
    assert "docs/configuration.md" in _links(readme)
    assert "locks-and-the-caches-lifecycle" in _anchors(REPO / "docs" / "cache-format.md")
    assert "training-recipe" in _anchors(REPO / "docs" / "configuration.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page: Path):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def _commands(text: str) -> list[list[str]]:
    """Every kdcache or make command line shown: in code (shell blocks and indented blocks, with `$ ` prompts and
    `\\` continuations) and in inline code spans; returns the words from `kdcache` or `make` on."""
    shell = [line for lang, body in FENCE.findall(text) if lang in ("", "bash", "sh", "console") for line in body.splitlines()]
    outside = FENCE.sub("", text).splitlines()
    shell += [line for line in outside if line.startswith("    ")]
    lines, joined = [], ""
    for line in shell:
        joined += line.strip().removeprefix("$ ")
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    prose = "\n".join(line for line in outside if not line.startswith("    "))
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(\S*bin/)?kdcache |make ", span)]
    found = []
    for line in lines:
        try:
            words = shlex.split(line.split(" # ")[0].split("   #")[0], posix=True)
        except ValueError:
            continue
        words = [w for w in words if w not in ("...", "…")]
        for i, word in enumerate(words):
            if word.endswith("bin/kdcache") or word == "kdcache" and (i == 0 or words[i - 1] == "-m"):
                found.append(["kdcache", *words[i + 1:]])
                break
            if word == "make" and all("=" in w for w in words[:i]):
                found.append(words[i:])
                break
    return found


def _check_kdcache(words: list[str]) -> list[str]:
    """What is wrong with one `kdcache ...` command line: an unknown command or option, a missing pipeline file."""
    command, rest = main, words[1:]
    while isinstance(command, click.Group):
        rest = [w for w in rest if w not in ("-v", "--verbose")]
        if not rest or rest[0].startswith("-"):
            return [] if not rest or rest[0] in ("--help", "--version") else [f"{rest[0]}: no such option of kdcache"]
        if rest[0] not in command.commands:
            return [f"no command {rest[0]!r} in {' '.join(words[:2])}"]
        command, rest = command.commands[rest[0]], rest[1:]
    options = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]} | {"--help"}
    problems = []
    for i, word in enumerate(rest):
        name = word.strip("[]").split("=")[0]
        if name.startswith("--") and name not in options and name != "--...":
            problems.append(f"{command.name}: no option {name}")
        if name == "--config" and i + 1 < len(rest) and rest[i + 1].startswith("pipelines/") and not (REPO / rest[i + 1]).is_file():
            problems.append(f"no pipeline file {rest[i + 1]}")
    return problems


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_shown_names_real_commands_options_and_files(page: Path):
    problems = []
    for words in _commands(page.read_text()):
        if words[0] == "kdcache":
            problems += _check_kdcache(words)
        else:
            targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            problems += [f"no make target {t!r}" for t in targets if t not in _make_targets()]
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_the_command_checker_catches_what_it_checks():
    text = "    $ kdcache dump-teacher --config pipelines/demo-student.yaml \\\n        --no-such-flag 1\n`kdcache cache nope`\n"
    problems = [p for words in _commands(text) for p in _check_kdcache(words)]
    assert problems == ["dump-teacher: no option --no-such-flag", "no command 'nope' in kdcache cache"]
    assert _check_kdcache(["kdcache", "train", "--config", "pipelines/missing.yaml"]) == ["no pipeline file pipelines/missing.yaml"]
    assert "test-fast" in _make_targets() and "demo" in _make_targets()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_pipeline_shown_is_a_valid_config(page: Path):
    for lang, body in FENCE.findall(page.read_text()):
        values = yaml.safe_load(body) if lang == "yaml" else None
        if isinstance(values, dict) and "task_type" in values:
            FineTuneConfig.from_dict(values, source=f"{page.name} yaml block").validate()

