"""Shared helpers for the benchmarks: tiny model builders, machine description, markdown tables.

The benchmarks run as scripts from the repository root (``python benchmarks/latency.py``), so
this module puts the repository's ``tests/`` folder on ``sys.path`` to reuse the random-weight
diffusers components of ``tests/models.py``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

from models import edit_inputs, tiny_vace_pipeline, tiny_vace_transformer  # noqa: E402

__all__ = [
    "REPO_ROOT", "RESULTS_DIR", "command_line", "cpu_model", "dynamo_graphs", "edit_inputs", "machine_description",
    "source_description",
    "markdown_table", "tiny_vace_pipeline", "tiny_vace_transformer", "utc_now", "write_table",
]


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo``, else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description() -> str:
    """One line for a results header: CPU, cores, torch / diffusers / Python versions, OS."""
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover - the benchmarks need diffusers anyway
        diffusers_version = "not installed"
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = cores
    parts = [
        f"{cpu_model()}, {cores} logical cores ({usable} usable, torch threads {torch.get_num_threads()})",
        f"torch {torch.__version__}",
        f"diffusers {diffusers_version}",
        f"Python {platform.python_version()}",
        f"{platform.system()} {platform.release()}",
    ]
    if torch.cuda.is_available():
        parts.insert(1, f"GPU {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


def source_description() -> str:
    """Where ``hetcache_compile`` was imported from, and the git state of this checkout."""
    import hetcache_compile

    package = Path(hetcache_compile.__file__).resolve().parent
    where = str(package.relative_to(REPO_ROOT)) if package.is_relative_to(REPO_ROOT) else str(package)
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "hetcache_compile", "passes")
        state = f"checkout at {commit}" + (", hetcache_compile/ or passes/ modified" if dirty else ", clean")
    except (OSError, subprocess.SubprocessError):
        state = "git state unknown"
    return f"hetcache_compile {hetcache_compile.__version__} imported from {where} ({state})"


def command_line() -> str:
    """The exact command that started this process, as typed from the repository root."""
    return shlex.join(["python", *sys.argv])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers are expected to be pre-formatted strings."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                header: Sequence[str] = (), notes: Sequence[str] = ()) -> Path:
    """Write ``benchmarks/results/<name>.md`` (title, header lines, table, notes), print it, return its path."""
    parts = [f"# {title}", ""]
    if header:
        parts += [f"- {line}" for line in header] + [""]
    parts += [markdown_table(columns, rows), ""]
    if notes:
        parts += [*notes, ""]
    text = "\n".join(parts)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"(written to {path.relative_to(REPO_ROOT)})")
    return path


def dynamo_graphs(model: torch.nn.Module, inputs: dict) -> list[tuple[torch.fx.GraphModule, list]]:
    """The graphs (and example inputs) Dynamo makes of one call ``model(**inputs)``, compiling nothing
    (``dynamic=False``; Dynamo's caches are reset first)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(**inputs, return_dict=False)
    return graphs
