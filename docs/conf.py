"""Sphinx configuration of the hpctrain documentation."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS / "_ext"))

import hpctrain  # noqa: E402

project = "hpctrain"
author = "hpctrain developers"
copyright = "hpctrain developers"
version = release = hpctrain.__version__

extensions = ["options_reference"]
exclude_patterns = ["_build"]
templates_path = []
highlight_language = "none"

html_theme = "alabaster"
html_theme_options = {
    "description": "Distributed training of machine-learning interatomic potentials",
    "page_width": "1100px",
}
html_static_path = ["_static"]
html_css_files = ["hpctrain.css"]
html_show_sourcelink = False
