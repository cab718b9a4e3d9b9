"""The documentation: README.md is short and complete, and every generated part (the
operator table, the table of test files, the benchmark tables and plot) is what its source
generates today.

Regenerate the generated parts with ``python docs/generate.py --write``.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest

import hod

ROOT = Path(__file__).resolve().parents[1]
FIX = "regenerate with `python docs/generate.py --write`"
DOC_PAGES = ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if not p.is_symlink()
)]


def _load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def test_operator_page_holds_the_op_database_table():
    problems = generate.operator_problems()
    assert not problems, f"{problems}: {FIX}"


def test_correctness_page_lists_every_test_file():
    problems = generate.test_file_problems()
    assert not problems, f"{problems}: {FIX}"


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_benchmark_section_is_made_from_the_latest_run(page: str):
    problems = generate.bench_problems(ROOT / page)
    assert not problems, f"{problems}: {FIX}"


@pytest.mark.parametrize("marker", sorted(generate.OWN_RUN_SECTIONS))
def test_own_run_sections_are_made_from_their_latest_run(marker: str):
    """The benchmarks page's sections of the sweeps with their own runs (taylor, zoo, ...)."""
    folder, make = generate.OWN_RUN_SECTIONS[marker]
    problems = generate.bench_problems(generate.BENCHMARKS, marker, folder, make)
    assert not problems, f"{problems}: {FIX}"


def test_benchmark_plot_is_drawn_from_the_readme_run():
    problems = generate.png_problems()
    assert not problems, f"{problems}: {FIX}"


def test_readme_is_a_short_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the limit is 250"


def test_readme_names_every_public_name():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in hod.__all__ if f"`hod.{name}" not in readme]
    assert not missing, f"README.md's API section does not name {missing}"


@pytest.mark.parametrize("page", DOC_PAGES)
def test_relative_links_reach_files(page: str):
    text = (ROOT / page).read_text()
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in local if not ((ROOT / page).parent / t).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


#: Paths of hod's modules as the pages write them: ``hod/_build.py``, ``_split.py``,
#: ``rules/nn.py``, ``passes/fold``, ``hod/passes/``.
MODULE = re.compile(
    r"(?<![\w/.])(hod/[\w/]+(?:\.py|/)|_\w+\.py|(?:rules|passes|decompositions)/\w*(?:\.py)?)"
)


def _module_exists(name: str) -> bool:
    path = ROOT / (name if name.startswith("hod/") else f"hod/{name}")
    return path.exists() or path.with_suffix(".py").exists()


@pytest.mark.parametrize("page", DOC_PAGES)
def test_modules_the_pages_name_exist(page: str):
    named = set(MODULE.findall((ROOT / page).read_text()))
    missing = sorted(name for name in named if not _module_exists(name))
    assert not missing, f"{page} names modules hod does not have: {missing}"


# -- the generator's own pieces ---------------------------------------------------------------
def test_a_marked_section_is_replaced_in_place_with_its_attributes():
    page = "# hod\n\n<!-- bench:start run=old.json -->\nold\n<!-- bench:end -->\n\nMore.\n"
    new = generate.with_section(page, "bench", "new", run="new.json")
    assert new == "# hod\n\n<!-- bench:start run=new.json -->\nnew\n<!-- bench:end -->\n\nMore.\n"
    section = generate.find_section(new, "bench")
    assert (section.body, section.attrs) == ("new", {"run": "new.json"})
    assert generate.find_section(new, "ops") is None
    with pytest.raises(ValueError, match="ops:start"):
        generate.with_section(new, "ops", "table")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def test_png_text_chunk_round_trip():
    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit grey
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
           + _chunk(b"IDAT", zlib.compress(b"\0\0")) + _chunk(b"IEND", b""))
    assert generate.png_text(png, "hod-run") is None
    tagged = generate.with_png_text(png, "hod-run", "bench/runs/run-1.json")
    assert generate.png_text(tagged, "hod-run") == "bench/runs/run-1.json"
    assert tagged.endswith(_chunk(b"IEND", b""))
