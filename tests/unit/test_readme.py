"""The README works in a fresh clone: its links resolve inside the repository, and the quick start's
commands do what it says (`make -n` for the make targets, the others run as written where they
finish by themselves; tests/e2e/test_serve_command.py runs the server)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")


def prose(text: str) -> str:
    """The text outside fenced code blocks (a link inside code is not a link)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path.read_text()).splitlines() if line.startswith("#")}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    """The fenced blocks of `text` whose info string is `lang` ("" for none)."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None:
                current, info = [], stripped[3:].strip()
            else:
                if info == lang:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line.strip() if lang == "sh" else line)
    return blocks


def sh_commands(text: str) -> list[str]:
    return [line.split("  #")[0].strip() for block in code_blocks(text, "sh") for line in block.splitlines()]


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc):
    bad = []
    for target in LINK.findall(prose(doc.read_text())):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.is_relative_to(REPO) or not dest.exists():
            bad.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def test_the_readme_points_nowhere_outside_the_clone():
    assert "../shared" not in README.read_text()
    assert "DESIGN.md" not in README.read_text()  # the design map is not in the repository


def test_quick_start_make_targets_pass_their_options():
    quick = section(README.read_text(), "Quick start")
    make_lines = [c for c in sh_commands(quick) if c.startswith("make ")]
    assert 'make serve ARGS="--expert-workers 4"' in make_lines
    for command in make_lines:
        argv = shlex.split(command)
        out = subprocess.run([argv[0], "-n", *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=True).stdout.splitlines()
        run = next(line for line in reversed(out) if "moe-serve" in line)
        args = [a.partition("=")[2] for a in argv[1:] if a.startswith("ARGS=")]
        assert run.split() == [".venv/bin/moe-serve", "serve", *" ".join(args).split()], (command, run)


def test_make_demo_model_writes_where_the_server_reads():
    from gateway.demo_checkpoint import default_demo_dir

    out = subprocess.run(["make", "-n", "demo-model"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    run = shlex.split(next(line for line in reversed(out) if "moe-serve" in line))
    # No directory argument: the CLI's default, the one `moe-serve serve` loads
    # (ensure_demo_checkpoint() without a directory is default_demo_dir()).
    assert run == [".venv/bin/moe-serve", "demo-model"]
    env_run = subprocess.run(["make", "-n", "demo-model", "serve", "DEMO_DIR=/tmp/demo-x"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert env_run.count("MOE_SERVE_DEMO_DIR=/tmp/demo-x") == 2  # both targets, the same directory
    assert default_demo_dir().name == "demo-model"


def test_quick_start_commands_that_finish_run_as_written(tmp_path):
    """`--help` and `demo-model` lines, run by bash from the repository root as the README has them,
    with the demo checkpoint sent to a scratch directory through the documented variable."""
    quick = section(README.read_text(), "Quick start")
    lines = sh_commands(quick)
    runnable = [c for c in lines if c.endswith("--help") or c.endswith("moe-serve demo-model")]
    assert len(runnable) == 2, lines
    env = dict(os.environ, MOE_SERVE_DEMO_DIR=str(tmp_path / "demo"))
    for command in runnable:
        res = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, (command, res.stderr[-3000:])
        if command.endswith("--help"):
            assert "--metrics-port" in res.stdout and "--host" in res.stdout
        else:
            assert Path(res.stdout.split()[-1]) == tmp_path / "demo"
            assert (tmp_path / "demo" / "config.json").is_file()


def test_quick_start_banner_is_the_real_one():
    from gateway.app import ServeOptions
    from gateway.serve_banner import MetricsEndpoint, banner, metrics_lines
    from workers.device.memory import MemoryReport

    quick = section(README.read_text(), "Quick start")
    shown = next(block for block in code_blocks(quick, "") if block.startswith("moe-serve: serving"))
    model_dir = "/home/you/.cache/moe-serve/demo-model"
    metrics = metrics_lines([MetricsEndpoint("127.0.0.1", 8080)], joined=False, metrics_port=8080)
    # What the demo's attention worker reports on a CPU (its weights and the default 1024 blocks).
    memory = [MemoryReport("cpu", "float32", 7382016, 1024, 16, 67108864)]
    real = banner(ServeOptions(model_dir=model_dir), grpc=True, key_from_env=False, metrics=metrics,
                  memory=memory)
    # The demo note depends on the directory holding the demo checkpoint; the README shows it.
    real_lines = real.splitlines()
    real_lines.insert(-1, "The demo model has random weights: expect random text, not an answer.")
    assert shown.splitlines() == real_lines
