"""The documentation: every guide's code runs, its tables and figures regenerate from results/, pages link up.

The full build (``sphinx-build -W --keep-going -b html docs docs/_build/html``, which also executes the
tutorial notebook) runs in ``.ci/run`` before the test suite; here it runs only with
``BNNJAX_TEST_DOCS_BUILD=1``, as it takes longer than the rest of this file.
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "results"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
PAGES = sorted(p for p in DOCS.rglob("*.md") if not p.is_relative_to(DOCS / "_build")
               and not p.is_relative_to(DOCS / "_generated"))
GUIDES = [p for p in PAGES if re.search(r"^```python\n", p.read_text(), re.M)]

sys.path.insert(0, str(ROOT / "experiments"))
import results_table  # noqa: E402
from _results import PROVENANCE_KEYS, read  # noqa: E402

sys.path.remove(str(ROOT / "experiments"))


def _name(path: Path) -> str:
    return str(path.relative_to(DOCS))


def code_blocks(text: str) -> list[str]:
    """A page's runnable code: its ```python fences (``{code-block}`` directives are shown, not run)."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_guides_have_code():
    assert {p.stem for p in GUIDES} >= {"porting", "training", "zoo", "deployment"}


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs Debian's dataset-fashion-mnist (real data)")
@pytest.mark.parametrize("page", GUIDES, ids=_name)
def test_guide_code_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{page.stem}"}
    for i, block in enumerate(code_blocks(page.read_text())):
        exec(compile(block, f"{_name(page)}, python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "False" not in out  # the pages print their checks (same predictions, equal outputs)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_shown_only_code_says_what_it_needs(page):
    # a block that cannot run in CI is a {code-block} with a caption that says why
    for block in re.findall(r"^```\{code-block\} python\n(.*?)^```", page.read_text(), re.S | re.M):
        caption = re.match(r":caption: (.*)\n", block)
        assert caption and re.match(r"(needs|Larq)", caption.group(1)), block


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_pages_speak_of_the_project(page):
    assert not re.search(r"\b(session|issue)s?\b", page.read_text(), re.I)


def test_every_page_is_in_a_toctree():
    listed = {"index"}
    for page in PAGES:
        for toctree in re.findall(r"^```\{toctree\}\n(.*?)^```", page.read_text(), re.S | re.M):
            for entry in toctree.splitlines():
                if entry.strip() and not entry.startswith(":"):
                    listed.add(str((page.parent / entry.strip()).relative_to(DOCS)))
    pages = {str(p.relative_to(DOCS).with_suffix("")) for p in PAGES}
    pages |= {str(p.relative_to(DOCS).with_suffix("")) for p in DOCS.glob("api/*.rst")}
    assert pages == listed


def test_included_tables_are_rendered_from_results():
    included = set()
    for page in PAGES:
        included |= set(re.findall(r"_generated/(\w+)\.md", page.read_text()))
    assert included and included <= set(results_table.TABLES)
    for name in included - {"zoo"}:  # zoo summarizes all 14 models: the build renders it
        table = results_table.render(name, RESULTS)
        assert table.count("\n") >= 2, name


def test_quoted_figures_exist():
    figures = results_table.summary_figures(RESULTS)
    for page in PAGES:
        for name in re.findall(r"\{\{(\w+)\}\}", page.read_text()):
            assert name in figures, f"{_name(page)} quotes {{{{{name}}}}}, which results_table does not compute"


@pytest.mark.parametrize("path", sorted([*RESULTS.glob("*.jsonl"), *RESULTS.glob("*/result.json")]),
                         ids=lambda p: str(p.relative_to(RESULTS)))
def test_result_lines_carry_provenance(path):
    rows = read(path)
    assert rows
    for row in rows:
        assert set(PROVENANCE_KEYS) <= set(row), f"{path.name}: a line without {set(PROVENANCE_KEYS) - set(row)}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", row["date"])
    assert not re.search(r"\bsession", path.read_text(), re.I)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (the plot extra)")
def test_figures_regenerate(tmp_path):
    """``python experiments/figures.py`` draws the committed PNGs from results/ (same pixels)."""
    import matplotlib.image

    spec = importlib.util.spec_from_file_location("figures", ROOT / "experiments" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec.loader.exec_module(figures)
        figures.main(["--out-dir", str(tmp_path)])
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    committed = DOCS / "_static" / "figures"
    assert drawn == sorted(p.name for p in committed.glob("*.png"))
    for name in drawn:
        new, old = matplotlib.image.imread(tmp_path / name), matplotlib.image.imread(committed / name)
        assert new.shape == old.shape, f"{name}: redraw with python experiments/figures.py"
        # fonts may antialias differently between matplotlib builds; the content may not change
        assert np.abs(new - old).mean() < 0.01, f"{name}: redraw with python experiments/figures.py"


@pytest.mark.skipif(os.environ.get("BNNJAX_TEST_DOCS_BUILD") != "1",
                    reason="the full documentation build runs in .ci/run; set BNNJAX_TEST_DOCS_BUILD=1 to run it here")
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="needs the docs extra (pip install -e '.[docs]')")
def test_docs_build_without_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS),
                           str(tmp_path / "html")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same predictions as the float model: True" in (tmp_path / "html" / "tutorial.html").read_text()
