"""mkdocs hook: the catalogue of tests/mutants.py, where a page holds `<!-- bugs -->` alone on a line
(docs/bugs.md). tests/mutants.py imports only the standard library, so the build needs neither torch nor pytest."""
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*bugs\s*-->[ \t]*$", re.MULTILINE)


def _catalogue():
    spec = importlib.util.spec_from_file_location("ssl_bugs_catalogue", ROOT / "tests" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown, page, **kwargs):
    if not MARKER.search(markdown):
        return markdown
    tables = _catalogue().markdown()
    return MARKER.sub(lambda m: tables, markdown)
