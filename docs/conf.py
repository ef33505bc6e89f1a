"""Sphinx configuration of bnnjax's documentation.

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

Tables and the figures quoted in the text are rendered from ``results/`` at build time
(``experiments/results_table.py``) into ``docs/_generated/``; the plots are PNGs under
``docs/_static/figures/``, drawn by ``python experiments/figures.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(DOCS / "_ext")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the notebook kernels import the bnnjax of this checkout, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import bnnjax  # noqa: E402
import results_table  # noqa: E402

project = "bnnjax"
author = "bnnjax contributors"
copyright = "bnnjax contributors"
release = version = bnnjax.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and executable notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "bnnjax_api",
]

exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints", "jupyter_execute"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}

# --- MyST ------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "amsmath", "deflist", "substitution"]
myst_heading_anchors = 3
# figures the text quotes (a latency, a ratio) come from results/, never typed by hand
myst_substitutions = results_table.summary_figures(ROOT / "results")

# --- notebooks (the tutorial runs at build time) -----------------------------------------------------
nb_execution_mode = os.environ.get("BNNJAX_DOCS_EXECUTE", "cache")  # "off" skips running the tutorial
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# stderr holds library notices (tqdm's missing-widgets warning in a kernel), not the pages' output
nb_output_stderr = "remove"

# --- API reference ---------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
python_maximum_signature_line_length = 100
add_module_names = False

# --- HTML ------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"bnnjax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
pygments_style = "default"


# --- generated tables ------------------------------------------------------------------------------

GENERATED = DOCS / "_generated"
RESULTS = ROOT / "results"


def _zoo_models() -> list[dict]:
    """``results_table.zoo_models()`` (bnnjax.summary of all 14 models), cached by the zoo's source."""
    sources = sorted((ROOT / "bnnjax").rglob("*.py"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    cache = GENERATED / "zoo_models.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["models"]
    models = results_table.zoo_models()
    cache.write_text(json.dumps({"key": key, "models": models}))
    return models


def write_tables(app) -> None:
    GENERATED.mkdir(exist_ok=True)
    for name in results_table.TABLES:
        if name == "zoo":
            text = results_table.zoo(RESULTS, models=_zoo_models())
        else:
            text = results_table.render(name, RESULTS)
        path = GENERATED / f"{name}.md"
        if not path.exists() or path.read_text() != text + "\n":  # unchanged files keep pages up to date
            path.write_text(text + "\n")
    if not any((DOCS / "_static" / "figures").glob("*.png")):
        raise RuntimeError("docs/_static/figures/ is empty: run python experiments/figures.py")


def setup(app):
    app.connect("builder-inited", write_tables)
