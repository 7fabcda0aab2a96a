"""Sphinx configuration of the atac-jax documentation (guides in Markdown, API from docstrings).

Build (offline, warnings are errors; tests/test_docs.py runs the same):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "atac-jax"
author = "atac-jax authors"
copyright = "atac-jax authors"  # pylint: disable=redefined-builtin

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",   # Google-style docstrings
    "sphinx.ext.viewcode",
    "myst_parser",           # the docs/*.md guides
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3

# Offline: no intersphinx, no remote images.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False,
                           "exclude-members": "name, parent, scope"}  # flax Module plumbing
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: flax dataclass fields are also members

html_theme = "alabaster"
html_static_path = []
