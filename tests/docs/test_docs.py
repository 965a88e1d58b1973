"""The documentation runs: every command and snippet in README.md, docs/*.md, SECURITY.md and
bench/README.md is executed as shown, and every relative link and #anchor resolves.

How the docs are tested (the convention every page follows; docs/README.md says the same):

- A fenced block tagged ```sh is a shell script: it runs verbatim with bash (`set -e`,
  `pipefail`) in a fresh temporary directory that holds a copy of `sample_checkpoints/`, with
  the venv's `wavg` first on PATH, and must exit 0. ```python runs the same way with the venv's
  python. The blocks of one file share one directory and run in order, so a block may use what
  an earlier block of the same file wrote. ```text and ```json are output, not run. Any other
  fence tag (or none) is refused, so nothing escapes by accident.
- HTML comments on the lines just before a fence change what happens to it:
  `<!-- doctest: exit N -->`: the block must exit N (an error example).
  `<!-- doctest: output -->` on a ```text block: it must equal what the previous run block of
  the file printed (stderr and stdout together), durations (`in 0.03 s`) excepted.
  `<!-- doctest: keras -->`: the block needs the `keras` extra; it still runs for real, and its
  file's test is marked slow (skipped where Keras is not installed).
  `<!-- doctest: tests/path/test_x.py -->`: not run here (it needs a bucket, a cluster, a
  fresh venv, long training); every command line of the block (`\\` continuations joined,
  comments dropped, whitespace normalised) must appear verbatim in that test file, which
  really runs it. `<!-- doctest: Makefile -->`: each line is `make TARGET` for a target the
  Makefile defines.
- Links: every relative link and image in these files names an existing path, and every
  `#anchor` (in the same file or in another .md file) matches a heading by GitHub's slug rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_checkpoints"
BIN = Path(sys.executable).parent
RUN_TAGS = {"sh", "python"}
OUTPUT_TAGS = {"text", "json"}
MARKER = re.compile(r"^<!--\s*doctest:\s*(.+?)\s*-->$")
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
DURATION = re.compile(r"\b\d+(\.\d+)? s\b")


def doc_files() -> list[Path]:
    """The documented files: README, SECURITY, the bench results page and every docs/ page."""
    named = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "bench" / "README.md"]
    return [p for p in named if p.exists()] + sorted((ROOT / "docs").glob("*.md"))


@dataclass
class Block:
    """One fenced block: its tag, body, line number and the doctest markers above it."""

    path: Path
    line: int
    tag: str
    body: str
    markers: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def carrier(self) -> str | None:
        """The file that carries this block instead of running it here, if any."""
        for marker in self.markers:
            if marker.startswith("tests/") or marker == "Makefile":
                return marker
        return None

    @property
    def expected_exit(self) -> int:
        for marker in self.markers:
            if marker.startswith("exit "):
                return int(marker.split()[1])
        return 0


def parse_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the doctest markers just above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        markers = []
        j = i - 1
        while j >= 0 and (found := MARKER.match(lines[j].strip())):
            markers.insert(0, found.group(1))
            j -= 1
        end = i + 1
        while end < len(lines) and lines[end].strip() != opening.group(1):
            end += 1
        body = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path, i + 1, opening.group(2), body, markers))
        i = end + 1
    return blocks


def command_lines(block: Block) -> list[str]:
    """The block's commands: continuations joined, comments dropped, whitespace normalised."""
    joined = re.sub(r"\\\n", " ", block.body)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line) if block.tag == "sh" else line
        line = " ".join(line.split())
        if line and not (block.tag == "python" and line.startswith("#")):
            commands.append(line)
    return commands


def _normalised(text: str) -> str:
    lines = [DURATION.sub("N s", line.rstrip()) for line in text.strip("\n").splitlines()]
    return "\n".join(lines)


def _needs_keras(path: Path) -> bool:
    return any("keras" in b.markers for b in parse_blocks(path))


def _param(path: Path):
    marks = [pytest.mark.slow] if _needs_keras(path) else []
    return pytest.param(path, id=str(path.relative_to(ROOT)), marks=marks)


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _run(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.tag == "sh":
        args = ["bash", "-e", "-o", "pipefail", "-c", block.body]
    else:
        args = [str(BIN / "python"), "-"]
    return subprocess.run(
        args,
        input=block.body if block.tag == "python" else None,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("path", [_param(p) for p in doc_files()])
def test_every_block_runs_as_shown(path: Path, tmp_path: Path) -> None:
    blocks = parse_blocks(path)
    if any("keras" in b.markers for b in blocks):
        pytest.importorskip("keras")
    shutil.copytree(SAMPLES, tmp_path / "sample_checkpoints")
    env = _environment()
    previous_output: str | None = None
    for block in blocks:
        allowed = RUN_TAGS | OUTPUT_TAGS
        assert block.tag in allowed, (
            f"{block.where}: fence tag {block.tag!r} is not one of {sorted(allowed)}"
        )
        if block.carrier == "Makefile":
            _check_make_targets(block)
        elif block.carrier:
            _check_carried(block, block.carrier)
        elif block.tag in RUN_TAGS:
            done = _run(block, tmp_path, env)
            assert done.returncode == block.expected_exit, (
                f"{block.where}: exit {done.returncode}, expected {block.expected_exit}\n{done.stdout[-3000:]}"
            )
            previous_output = done.stdout
        elif "output" in block.markers:
            assert previous_output is not None, f"{block.where}: no run block before this output"
            assert _normalised(block.body) == _normalised(previous_output), (
                f"{block.where}: the documented output differs from a real run:\n{previous_output}"
            )


def _check_carried(block: Block, carrier: str) -> None:
    test_file = ROOT / carrier
    assert test_file.is_file(), f"{block.where}: the marker names {carrier}, which does not exist"
    text = " ".join(test_file.read_text(encoding="utf-8").split())
    missing = [c for c in command_lines(block) if c not in text]
    assert not missing, f"{block.where}: {carrier} never runs {missing}"


def _check_make_targets(block: Block) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    for command in command_lines(block):
        words = command.split()
        assert words[0] == "make" and set(words[1:]) <= targets, (
            f"{block.where}: {command!r} is not make with targets of the Makefile {sorted(targets)}"
        )


# ---------------------------------------------------------------------------------------------
# Links and anchors


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup dropped, lower case, punctuation
    removed (letters, digits, `-`, `_` and spaces kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines: its headings (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading and not in_fence:
            slug = github_slug(heading.group(1))
            count = seen.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return found


def links(path: Path) -> list[str]:
    """The link and image targets of a Markdown file, outside code blocks and code spans."""
    targets = []
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            line = re.sub(r"`[^`]*`", "", line)
            targets += re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)
    return targets


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file that name no file, or no heading of it."""
    broken = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path) -> None:
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}: {broken}"


def test_slugs_follow_github_rules() -> None:
    assert github_slug("`wavg bn-update`: recompute BatchNorm statistics") == (
        "wavg-bn-update-recompute-batchnorm-statistics"
    )
    assert github_slug("Remote checkpoints (`s3://`, `gs://`)") == "remote-checkpoints-s3-gs"
    assert (
        github_slug("What wavg refuses (one line, exit 1)") == "what-wavg-refuses-one-line-exit-1"
    )
    assert github_slug("Orbax [checkpoints](x.md)") == "orbax-checkpoints"


def test_the_parser_reads_markers_continuations_and_carried_commands(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n<!-- doctest: exit 1 -->\n```sh\nwavg combine a.h5 \\\n  -o b.h5  # note\n```\n"
        "\n```text\nout\n```\n"
    )
    first, second = parse_blocks(page)
    assert (first.tag, first.line, first.expected_exit, first.markers) == ("sh", 4, 1, ["exit 1"])
    assert command_lines(first) == ["wavg combine a.h5 -o b.h5"]
    assert (second.tag, second.markers, second.body) == ("text", [], "out\n")
    assert anchors(page) == {"title"}
    other = tmp_path / "other.md"
    other.write_text("[a](page.md#title) [b](page.md#nope) `[c](no.md)` [d](no.md) [e](#x)\n")
    assert broken_links(other) == [
        "page.md#nope: no heading with that anchor",
        "no.md: no such file",
        "#x: no heading with that anchor",
    ]


# ---------------------------------------------------------------------------------------------
# The README's install block, which needs a fresh venv, runs here (it is marked as carried by
# this file): the core install alone, then the README's quick start.

INSTALL = """
python3 -m venv .venv && .venv/bin/pip install .
. .venv/bin/activate
"""


def _quick_start() -> str:
    """The sh blocks of the README's Quick start section, in order."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return "".join(re.findall(r"```sh\n(.*?)```", section, flags=re.S))


@pytest.mark.slow
def test_a_fresh_clone_installs_the_core_and_runs_the_quick_start(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, clone / name)
    for folder in ("wavg", "sample_checkpoints"):
        shutil.copytree(ROOT / folder, clone / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    script = INSTALL + _quick_start() + "python -c 'import keras' 2>/dev/null && exit 3 || true\n"
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=clone, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (clone / "avg5.h5").is_file() and (clone / "avg.h5").is_file()
    assert "wrote avg5.h5" in done.stdout
