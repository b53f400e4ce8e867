"""The catalogue of bugs that train (tests/mutants.py), checked for its shape at every run; the mutants themselves
run outside the suite (`python -m tests.mutants`). Every entry still applies to the tree (so a change elsewhere
that moves an entry's code is caught here, at once), names tests that exist, and says where it happened."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from tests import mutants  # noqa: E402


def test_the_catalogue_holds_at_least_30_bugs_with_unique_names():
    names = [m.name for m in mutants.CATALOGUE]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-zA-Z0-9]+)*", n) for n in names), names
    for m in mutants.CATALOGUE:
        assert m.bug.endswith(".") and m.effect.endswith(".") and m.group and m.edits and m.tests, m.name


@pytest.mark.parametrize("mutant", mutants.CATALOGUE, ids=[m.name for m in mutants.CATALOGUE])
def test_each_entry_applies_exactly_once_and_leaves_python(mutant):
    """Every old text occurs exactly once in its file (mutants.mutated raises otherwise), the rewrite changes
    the file, and the rewritten file is still Python (a bug that trains, not one that cannot start)."""
    for file, text in mutants.mutated(mutant).items():
        assert text != (ROOT / file).read_text(encoding="utf-8"), f"{mutant.name} does not change {file}"
        ast.parse(text, filename=file)


def test_each_entry_says_where_it_happened():
    link = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+")
    for m in mutants.CATALOGUE:
        assert m.field and all(f == mutants.REVIEW or link.fullmatch(f) for f in m.field), m.name


def test_each_entry_names_tests_that_exist(request):
    """Every node ID is collected: from this session's collection when its file was collected (the whole
    suite), else by collecting those files in a subprocess."""
    wanted = {t for m in mutants.CATALOGUE for t in m.tests}
    assert all(t.startswith("tests/test_") and "::" in t for t in wanted)
    def plain(nodeid):  # pytest-xdist's --dist loadgroup appends "@group" to a grouped test's id
        return nodeid[:nodeid.rfind("@")] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid
    collected = {plain(item.nodeid) for item in request.session.items}
    files = {plain(item.nodeid).split("::")[0] for item in request.session.items}
    missing_files = sorted({t.split("::")[0] for t in wanted} - files)
    if missing_files:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-o", "addopts=", *missing_files], cwd=ROOT, capture_output=True, text=True).stdout
        collected |= set(out.split())
    assert not sorted(wanted - collected), f"not collected: {sorted(wanted - collected)}"


def test_the_docs_page_lists_every_entry():
    """docs/bugs.md generates its entries from the catalogue (docs/bugs_hook.py), and the nav shows the page."""
    page = (ROOT / "docs" / "bugs.md").read_text(encoding="utf-8")
    assert re.search(r"^<!-- bugs -->$", page, re.MULTILINE)
    tables = mutants.markdown()
    for m in mutants.CATALOGUE:
        assert f"**{m.name}**" in tables, m.name
        assert all(t.split("::")[1] in tables for t in m.tests), m.name
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s+- docs/bugs_hook\.py$", config, re.MULTILINE)
    assert re.search(r"^\s+- [^:]+: bugs\.md$", config, re.MULTILINE)
