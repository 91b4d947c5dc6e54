"""The README and docs/ hold: every relative link reaches a file (and heading) of the repository, every
`vlm-jax` command they show exists with the flags shown, and every document they name is in the repository."""

import contextlib
import functools
import io
import os
import re
import subprocess

import pytest

from vlm_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
  f for f in subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?<![\w/.-])vlm-jax[ \t]+([a-z][a-z-]*)((?:[^\n`&|;)]|\\\n)*)")
MD_FILE = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)*[\w./-]*\.md)\b")  # a file a page names: links and plain text
FLAG = re.compile(r"(?<!\S)(--[a-z][\w-]*)(?![\w.])")  # not --config.KEY=VALUE overrides


def _read(page: str) -> str:
  with open(os.path.join(ROOT, page)) as f:
    return f.read()


def _slug(heading: str) -> str:
  """GitHub's heading anchor: lowercase, punctuation other than - and _ dropped, spaces to -."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.cache
def _anchors(page: str) -> set[str]:
  text = FENCE.sub("", _read(page))
  return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _code(text: str) -> list[str]:
  """The fenced blocks and inline `code` spans of a page: where commands are shown."""
  blocks = FENCE.findall(text)
  return blocks + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


@functools.cache
def _help(command: str) -> str:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
    cli.main([command, "--help"])
  return out.getvalue()


def test_the_docs_exist():
  assert "README.md" in PAGES and len([p for p in PAGES if p.startswith("docs/")]) >= 10, PAGES


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  broken = []
  for target in LINK.findall(FENCE.sub("", _read(page))):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if resolved.startswith("..") or not os.path.exists(os.path.join(ROOT, resolved)):
      broken.append(f"{target}: no file {resolved}")
    elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
      broken.append(f"{target}: no heading #{anchor} in {resolved}")
  assert not broken, f"{page}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES)
def test_commands_shown_exist_with_their_flags(page):
  wrong = []
  for code in _code(_read(page)):
    for command, rest in COMMAND.findall(code):
      if command not in cli.COMMANDS:
        wrong.append(f"vlm-jax {command}: no such command")
        continue
      for flag in FLAG.findall(rest):
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w.-])", _help(command)):
          wrong.append(f"vlm-jax {command} {flag}: not in its --help")
  assert not wrong, f"{page}: " + "; ".join(wrong)


def test_the_command_check_can_fail():
  assert COMMAND.findall("vlm-jax train --config c.py --no-such-flag")[0][0] == "train"
  assert "--no-such-flag" in FLAG.findall(COMMAND.findall("vlm-jax train --config c.py --no-such-flag")[0][1])
  assert not re.search(r"(?<![\w-])--no-such-flag(?![\w.-])", _help("train"))


@pytest.mark.parametrize("page", PAGES)
def test_every_page_a_page_names_is_in_the_repository(page):
  """Links and plain text alike: a .md file named relative to the page or to the repository root
  exists in the repository (no page leans on documents users do not have)."""
  missing = []
  for name in set(MD_FILE.findall(_read(page))):
    here = os.path.normpath(os.path.join(os.path.dirname(page), name))
    if not any(
      not p.startswith("..") and os.path.isfile(os.path.join(ROOT, p)) for p in (here, os.path.normpath(name))
    ):
      missing.append(name)
  assert not missing, f"{page}: names {sorted(missing)}, which the repository does not have"
