"""The generated parts of the documentation, and a check that they are current.

    python docs/generate.py                 # check: exit 1 naming every stale part
    python docs/generate.py --write         # regenerate from the latest run in bench/runs/
    python docs/generate.py --write --run bench/runs/run-<stamp>.json

Generated parts sit between markers in Markdown files:

* ``<!-- ops:start -->`` ... ``<!-- ops:end -->`` in ``docs/operators.md``: the op
  database's table (``tests/opdb/table.py``);
* ``<!-- tests:start -->`` ... ``<!-- tests:end -->`` in ``docs/correctness.md``: one row
  per test file, the first paragraph of its docstring;
* ``<!-- bench:start run=PATH -->`` ... ``<!-- bench:end -->`` in ``README.md`` (headline
  and summary table) and in ``docs/benchmarks.md`` (headline, summary and one table per
  sweep): made by ``bench.tables`` from the run ``PATH`` names (relative to the repository
  root);
* ``<!-- taylor:start run=PATH -->``, ``<!-- per-sample:start run=PATH -->``,
  ``<!-- zoo:start run=PATH -->``, ``<!-- chunks:start run=PATH -->`` and
  ``<!-- sparse:start run=PATH -->`` sections in ``docs/benchmarks.md``: the latest run in
  ``bench/runs/taylor/``, ``bench/runs/per-sample/``, ``bench/runs/zoo/``,
  ``bench/runs/chunks/``, respectively ``bench/runs/sparse/``, each sweep's table (the
  per-sample, zoo, chunks and sparse ones after the run's headline);
* ``docs/assets/benchmark.png``: ``bench.tables.plot_summary`` of the same run, with the
  run's path in a PNG text chunk (``hod-run``) so that a check can tell which run drew it.

``tests/test_docs.py`` runs the same checks as this script without ``--write``.
"""

from __future__ import annotations

import ast
import re
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPERATORS = ROOT / "docs" / "operators.md"
CORRECTNESS = ROOT / "docs" / "correctness.md"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
PNG = ROOT / "docs" / "assets" / "benchmark.png"
RUNS = ROOT / "bench" / "runs"
TAYLOR_RUNS = RUNS / "taylor"  # apart, so that a taylor-only run is never "the latest run"
PER_SAMPLE_RUNS = RUNS / "per-sample"  # apart for the same reason
ZOO_RUNS = RUNS / "zoo"  # and again
CHUNKS_RUNS = RUNS / "chunks"  # and again
SPARSE_RUNS = RUNS / "sparse"  # and again
PNG_KEY = "hod-run"
PLOT_ALT = "median time per call of hod and of each peer's best setting, per sweep (log scale)"

for path in (ROOT, ROOT / "tests"):  # bench.tables, and the op database (tests/opdb)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


# -- marked sections --------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """The text between ``<!-- NAME:start ATTRS -->`` and ``<!-- NAME:end -->``."""

    body: str
    attrs: dict[str, str]


def _start(name: str) -> re.Pattern:
    return re.compile(rf"<!-- {name}:start((?: [\w-]+=\S+)*) -->")


def find_section(text: str, name: str) -> Section | None:
    """The marked section ``name`` of ``text`` (body stripped), or None when unmarked."""
    start = _start(name).search(text)
    end = text.find(f"<!-- {name}:end -->", start.end()) if start else -1
    if end < 0:
        return None
    attrs = dict(pair.split("=", 1) for pair in start.group(1).split())
    return Section(text[start.end():end].strip(), attrs)


def with_section(text: str, name: str, body: str, **attrs: str) -> str:
    """``text`` with the marked section ``name`` replaced by ``body`` and ``attrs``.

    Raises ValueError when ``text`` has no such section: where it goes is the page's
    choice, not the generator's.
    """
    start = _start(name).search(text)
    end_marker = f"<!-- {name}:end -->"
    if start is None or end_marker not in text[start.end():]:
        raise ValueError(f"no <!-- {name}:start --> ... {end_marker} section")
    head_attrs = "".join(f" {key}={value}" for key, value in attrs.items())
    rest = text[start.end():].split(end_marker, 1)[1]
    return f"{text[:start.start()]}<!-- {name}:start{head_attrs} -->\n{body}\n{end_marker}{rest}"


# -- PNG text chunk ---------------------------------------------------------------------------
def _png_chunks(data: bytes):
    """``(type, payload, start, end)`` of each chunk of a PNG file."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        yield kind, data[pos + 8:pos + 8 + length], pos, pos + 12 + length
        pos += 12 + length


def png_text(data: bytes, key: str) -> str | None:
    """The value of the ``tEXt`` chunk ``key`` of a PNG, or None."""
    for kind, payload, _, _ in _png_chunks(data):
        if kind == b"tEXt" and payload.split(b"\0", 1)[0] == key.encode():
            return payload.split(b"\0", 1)[1].decode("latin-1")
    return None


def with_png_text(data: bytes, key: str, value: str) -> bytes:
    """``data`` with a ``tEXt`` chunk ``key=value`` added before its ``IEND`` chunk."""
    payload = key.encode("latin-1") + b"\0" + value.encode("latin-1")
    chunk = b"tEXt" + payload
    chunk = struct.pack(">I", len(payload)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    for kind, _, start, _ in _png_chunks(data):
        if kind == b"IEND":
            return data[:start] + chunk + data[start:]
    raise ValueError("PNG without IEND chunk")


# -- what each part should hold ---------------------------------------------------------------
def operator_table() -> str:
    from opdb import OPS
    from opdb.table import markdown_table

    return markdown_table(OPS)


def test_file_table() -> str:
    """One row per ``tests/test_*.py``: its name and the first paragraph of its docstring."""
    lines = ["| file | what it checks |", "|---|---|"]
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = " ".join(doc.split("\n\n", 1)[0].split()).replace("|", "\\|")
        lines.append(f"| `{path.name}` | {summary} |")
    return "\n".join(lines)


def run_label(run_path: Path) -> str:
    """How markers name a run: relative to the repository root when inside it."""
    run_path = Path(run_path).resolve()
    return str(run_path.relative_to(ROOT)) if run_path.is_relative_to(ROOT) else str(run_path)


def _run_file(label: str) -> Path:
    return ROOT / label


def readme_bench(run_path: Path) -> str:
    """README's part: the headline and the summary table of one run, and the plot."""
    from bench import tables

    run = tables.load_run(run_path)
    return "\n\n".join([
        tables.headline(run),
        tables.summary_table(run),
        f"![{PLOT_ALT}](docs/assets/benchmark.png)",
    ])


def benchmarks_bench(run_path: Path) -> str:
    """The benchmarks page's part: headline, summary, plot and one table per sweep."""
    from bench import tables

    run = tables.load_run(run_path)
    return "\n\n".join([
        tables.headline(run),
        "## Summary",
        tables.summary_table(run),
        f"![{PLOT_ALT}](assets/benchmark.png)",
        "## Every sweep",
        tables.sweep_tables(run),
    ])


def taylor_bench(run_path: Path) -> str:
    """The benchmarks page's Taylor part: the taylor sweep's table of one run."""
    from bench import tables

    return tables.sweep_tables(tables.load_run(run_path))


def per_sample_bench(run_path: Path) -> str:
    """The benchmarks page's per-sample part: the run's headline (machine, software, checks)
    and the per-sample sweep's table."""
    from bench import tables

    run = tables.load_run(run_path)
    return "\n\n".join([tables.headline(run), tables.sweep_tables(run)])


#: The zoo part: the run's headline and the zoo sweep's table, as the per-sample part.
zoo_bench = per_sample_bench
#: The chunks part (chunk_size= and group=), the same again.
chunks_bench = per_sample_bench
#: The sparse part (sparse=True), the same again.
sparse_bench = per_sample_bench

#: The benchmarks page's sections made from the latest run of their own folder: marker ->
#: (folder, what the section holds).
OWN_RUN_SECTIONS: dict[str, tuple[Path, Callable[[Path], str]]] = {
    "taylor": (TAYLOR_RUNS, taylor_bench),
    "per-sample": (PER_SAMPLE_RUNS, per_sample_bench),
    "zoo": (ZOO_RUNS, zoo_bench),
    "chunks": (CHUNKS_RUNS, chunks_bench),
    "sparse": (SPARSE_RUNS, sparse_bench),
}

BENCH_PAGES: dict[Path, Callable[[Path], str]] = {
    README: readme_bench, BENCHMARKS: benchmarks_bench,
}


def latest_committed_run(folder: Path = RUNS) -> Path | None:
    """The newest run in ``folder`` (``bench/runs/``), or None when there is none yet."""
    from bench import tables

    try:
        return tables.latest_run(folder)
    except FileNotFoundError:
        return None


# -- check and write --------------------------------------------------------------------------
def operator_problems() -> list[str]:
    """Why ``docs/operators.md``'s table is stale (empty when current)."""
    section = find_section(OPERATORS.read_text(), "ops")
    if section is None or section.body != operator_table():
        return [f"{OPERATORS.relative_to(ROOT)}: the operator table is stale"]
    return []


def test_file_problems() -> list[str]:
    """Why ``docs/correctness.md``'s table of test files is stale (empty when current)."""
    section = find_section(CORRECTNESS.read_text(), "tests")
    if section is None or section.body != test_file_table():
        return [f"{CORRECTNESS.relative_to(ROOT)}: the table of test files is stale"]
    return []


def bench_problems(
    page: Path, marker: str = "bench", folder: Path = RUNS,
    generate: Callable[[Path], str] | None = None,
) -> list[str]:
    """Why ``page``'s ``marker`` section is stale: made from another run than the latest
    one in ``folder`` (when there is one), from a run that is missing, or different from
    what its run makes (with ``generate``, by default the page's :data:`BENCH_PAGES`)."""
    name = page.relative_to(ROOT)
    section = find_section(page.read_text(), marker)
    label = section.attrs.get("run") if section else None
    if label is None:
        return [f"{name}: no <!-- {marker}:start run=... --> section"]
    problems = []
    latest = latest_committed_run(folder)
    if latest is not None and label != run_label(latest):
        problems.append(f"{name}: made from {label}, the latest run is {run_label(latest)}")
    generate = generate or BENCH_PAGES[page]
    if not _run_file(label).is_file():
        problems.append(f"{name}: the run it was made from, {label}, does not exist")
    elif section.body != generate(_run_file(label)).strip():
        problems.append(f"{name}: the {marker} section differs from what {label} makes")
    return problems


def png_problems() -> list[str]:
    """Why the plot is stale: drawn from another run than README's tables, or missing."""
    section = find_section(README.read_text(), "bench")
    readme_run = section.attrs.get("run") if section else None
    drawn = png_text(PNG.read_bytes(), PNG_KEY) if PNG.is_file() else None
    if drawn is None or drawn != readme_run:
        return [f"{PNG.relative_to(ROOT)}: drawn from {drawn}, README.md uses {readme_run}"]
    return []


def stale_parts() -> list[str]:
    """A sentence for each generated part that differs from what its source generates."""
    return [
        *operator_problems(), *test_file_problems(), *bench_problems(README),
        *bench_problems(BENCHMARKS), *png_problems(),
        *(problem for marker, (folder, generate) in OWN_RUN_SECTIONS.items()
          for problem in bench_problems(BENCHMARKS, marker, folder, generate)),
    ]


def write(run_path: Path) -> None:
    """Regenerate every part: the op table, and the benchmark parts from ``run_path``."""
    from bench import tables

    OPERATORS.write_text(with_section(OPERATORS.read_text(), "ops", operator_table()))
    CORRECTNESS.write_text(with_section(CORRECTNESS.read_text(), "tests", test_file_table()))
    label = run_label(run_path)
    for page, generate in BENCH_PAGES.items():
        page.write_text(with_section(page.read_text(), "bench", generate(run_path), run=label))
    for marker, (folder, generate) in OWN_RUN_SECTIONS.items():
        latest = latest_committed_run(folder)
        if latest is not None:
            BENCHMARKS.write_text(with_section(BENCHMARKS.read_text(), marker,
                                               generate(latest), run=run_label(latest)))
    PNG.parent.mkdir(parents=True, exist_ok=True)
    tables.plot_summary(tables.load_run(run_path), PNG)
    PNG.write_bytes(with_png_text(PNG.read_bytes(), PNG_KEY, label))


def main(argv: list[str]) -> int:
    if "--write" not in argv:
        problems = stale_parts()
        print("\n".join(problems) or "the generated documentation is current")
        return 1 if problems else 0
    if "--run" in argv:
        run_path = Path(argv[argv.index("--run") + 1])
    else:
        run_path = latest_committed_run()
        if run_path is None:
            print(f"no run in {RUNS.relative_to(ROOT)}/: name one with --run PATH")
            return 1
    write(run_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
