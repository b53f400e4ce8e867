"""The documentation site: `mkdocs build --strict`; every method page shows its whole file, line by line,
beside the equations it implements, each equation tied to its lines and each reference in the code to
its target; content generated from the real files, nothing loaded from outside; and, in one headless
Chromium session, every page at 390, 1024, 1280 and 1440 px: maths rendered, nothing wider than its box,
the code pane unpadded, no name in it broken and as wide as the commentary, no list rendered as a
paragraph, no identifier broken in a table, no punctuation stranded after inline maths, each method's
diagram shown; and the site opened from disk (file://) navigates and searches. Each equation lists the
code lines that compute it."""
import functools
import html
import html.parser
import http.server
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("docs")  # one worker builds the site once and runs the browser once

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
METHOD_HEADINGS = ["## What changes from", "## Why it works", "## Walkthrough", "## Hyper-parameters", "## Deviations from the paper",
                   "## Multi-GPU", "## Logged metrics", "## Results", "## Sources"]
WIDTHS = [390, 1024, 1280, 1440]
MARKER = re.compile(r"#\s*--8<--\s*\[(start|end):([a-z][-_0-9a-z]*)\]")


def existing_methods():
    return [m for m in METHODS if (ROOT / f"{m}.py").is_file()]


def pages():
    return {p.relative_to(DOCS).as_posix(): p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}


def once(tmp_path_factory, name, make):
    """`make(path)` run once per test session, whichever pytest-xdist worker asks first (the others wait
    and reuse its result: the workers of one session share the parent of their temporary folders)."""
    import fcntl
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    path, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The site built with `mkdocs build --strict` into a temporary directory, once per session."""
    def build(out):
        env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
        p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if "No module named mkdocs" in p.stderr:
            pytest.fail("mkdocs is not installed: `uv sync` (the test group includes the docs group)")
        assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    return once(tmp_path_factory, "site", build)


def built(site, name):
    """The built HTML of docs/NAME.md (the offline plugin turns directory URLs off: NAME.html)."""
    return site / f"{name}.html"


def test_strict_build_writes_every_page(site):
    for name in pages():
        assert built(site, name.removesuffix(".md")).is_file(), f"docs/{name} was not built"


def test_method_files_carry_nothing_for_the_site():
    """A reader of a method file sees the paper's lines only: the pages find their blocks by the code's
    own text (a def, a class, a line), never by build markers such as `# --8<-- [start:x]`."""
    for method in existing_methods():
        text = (ROOT / f"{method}.py").read_text(encoding="utf-8")
        found = [i for i, line in enumerate(text.splitlines(), 1) if MARKER.search(line)]
        assert not found, f"{method}.py carries docs build markers on lines {found}"


def test_every_method_file_has_a_page_in_the_nav():
    from mkdocs.config import load_config
    config = load_config(str(ROOT / "mkdocs.yml"))

    def flatten(nav):
        for item in nav:
            values = item.values() if isinstance(item, dict) else [item]
            for v in values:
                yield from flatten(v) if isinstance(v, list) else [v]
    nav = set(flatten(config["nav"]))
    for method in existing_methods():
        assert f"{method}.md" in nav, f"{method}.py has no page docs/{method}.md in the nav of mkdocs.yml"


@pytest.mark.parametrize("method", existing_methods())
def test_method_page_follows_the_template(method):
    """The headings in order, the walk-through of the page's own file, its diagram, the paper's equation
    numbers, a Deviations section that is a list, and no diff but MoCo v1 -> v2."""
    page = DOCS / f"{method}.md"
    assert page.is_file(), f"docs/{method}.md is missing"
    text = page.read_text(encoding="utf-8")
    positions = [text.find("\n" + h) for h in METHOD_HEADINGS]
    missing = [h for h, p in zip(METHOD_HEADINGS, positions) if p < 0]
    assert not missing, f"docs/{method}.md lacks the headings {missing}"
    assert positions == sorted(positions), f"docs/{method}.md: headings not in the order {METHOD_HEADINGS}"
    assert re.search(rf"^<!--\s*annotate\s+{method}\.py\b", text, re.MULTILINE), f"docs/{method}.md: no walk-through"
    assert f"](assets/diagrams/{method}.svg)" in text, f"docs/{method}.md does not show its diagram"
    assert (DOCS / "assets" / "diagrams" / f"{method}.svg").is_file(), f"docs/assets/diagrams/{method}.svg is missing"
    assert "\\tag{" in text, f"docs/{method}.md numbers no equation with the paper's number (\\tag{{...}})"
    at = METHOD_HEADINGS.index("## Deviations from the paper")
    deviations = text[positions[at]:positions[at + 1]]
    assert re.search(r"\n\n- ", deviations), f"docs/{method}.md: its Deviations section is not a list"
    assert ("<!-- diff mocov1.py mocov2.py -->" in text) == (method == "mocov2"), \
        f"docs/{method}.md: the only diff is MoCo v1 -> v2, on the MoCo v2 page"


CONCEPTS = {"LARS": "lars", "SyncBN": "syncbn", "ShuffleBN": "shufflebn", "CIFAR stem": "cifar-stem"}


@pytest.mark.parametrize("method", existing_methods())
def test_one_heading_per_section_and_building_blocks_linked_at_first_use(method):
    """No two headings of a method page alike (the walk-through's Args block is "### Arguments", the
    table "## Hyper-parameters"); and the first mention of LARS, SyncBN, ShuffleBN or the CIFAR stem in
    the page's prose (outside code, image descriptions and captions) links its definition."""
    text = (DOCS / f"{method}.md").read_text(encoding="utf-8")
    headings = [h.lstrip("#").strip() for h in re.findall(r"^#{2,6} .*$", text, re.MULTILINE)]
    assert len(headings) == len(set(headings)), \
        f"docs/{method}.md repeats the headings {sorted({h for h in headings if headings.count(h) > 1})}"
    prose = re.sub(r"!\[[^\]]*\]\([^)]*\)|<figcaption.*?</figcaption>|<!--.*?-->|`[^`\n]*`", "", text, flags=re.DOTALL)
    for term, anchor in CONCEPTS.items():
        i = prose.find(term)
        if i >= 0:
            linked = prose[:i].endswith("[") and prose[i + len(term):].startswith(f"](concepts.md#{anchor})")
            assert linked, f"docs/{method}.md: the first '{term}' ({prose[max(0, i - 50):i + 30]!r}) does not " \
                           f"link concepts.md#{anchor}"
    sources = text[text.find("\n## Sources"):]
    assert re.search(r"\bv\d+\b", sources) and "version" in sources, \
        f"docs/{method}.md: its Sources do not say which arXiv version the section numbers refer to"


class _Code(html.parser.HTMLParser):
    """The walk-through's code blocks of a built page: [(data-start, data-end, text, [line ids])], and the
    references to a paper in that text that are not links ([(block start, reference)])."""

    REF = re.compile(r"Eqs?\. \d+|§ ?\d+(?:\.\d+)*|Alg\. \d+|App\. [A-Z]\b|Table \d+|Fig\. \d+")

    def __init__(self):
        super().__init__()
        self.blocks, self.unlinked, self.links, self.padded = [], [], [], set()
        self._depth = 0  # depth inside the current div.ann-code, 0 outside
        self._in_code = self._in_ref = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "div" and "ann-code" in classes and "data-start" in a:
            self.blocks.append([int(a["data-start"]), int(a["data-end"]), [], []])
            self._depth = 1
            return
        if self._depth and tag == "div":
            self._depth += 1
        if self._depth and tag == "code":
            self._in_code = True
        if self._in_code and tag == "span" and a.get("id", "").startswith("L"):
            self.blocks[-1][3].append(int(a["id"][1:]))
            if "ann-pad" in classes:
                self.padded.add(int(a["id"][1:]))
        if self._in_code and tag == "a" and "ann-ref" in classes:
            self._in_ref = True
            self.links.append(a.get("href", ""))

    def handle_endtag(self, tag):
        if self._depth and tag == "div":
            self._depth -= 1
        if tag == "code":
            self._in_code = False
        if tag == "a":
            self._in_ref = False

    def handle_data(self, data):
        if self._in_code:
            self.blocks[-1][2].append(("ref" if self._in_ref else "text", data))


def code_shown(site, method):
    parser = _Code()
    parser.feed(built(site, method).read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize("method", existing_methods())
def test_each_method_page_shows_its_whole_file_line_by_line(method, site):
    """The code shown on the built page, concatenated, is the file after its module docstring: every line
    exactly once, in order, each with its own line number."""
    import ast
    text = (ROOT / f"{method}.py").read_text(encoding="utf-8")
    first = ast.parse(text).body[0].end_lineno + 1  # the line after the module docstring
    lines = text.splitlines(keepends=True)
    blocks = code_shown(site, method).blocks
    assert blocks, f"{method}: no walk-through code on the page"
    shown = "".join("".join(d for _, d in parts) for _, _, parts, _ in blocks)
    assert shown == "".join(lines[first - 1:]), f"{method}: the code on the page is not the file from line {first} on"
    numbers = [n for *_, ids in blocks for n in ids]
    assert numbers == list(range(first, len(lines) + 1)), f"{method}: line numbers missing, repeated or out of order"
    assert [(a, b) for a, b, *_ in blocks] == [(ids[0], ids[-1]) for *_, ids in blocks]


@pytest.mark.parametrize("method", existing_methods())
def test_no_block_is_padded_with_blank_lines(method, site):
    """The blank lines at either end of a block (those between two blocks) are on the page, hidden
    (`ann-pad`, display: none); every other line is shown: a block shows from its first line of text to
    its last, blank lines inside it kept."""
    lines = (ROOT / f"{method}.py").read_text(encoding="utf-8").splitlines()
    parser = code_shown(site, method)
    for _, _, _, ids in parser.blocks:
        text = [n for n in ids if lines[n - 1].strip()]
        if not text:
            continue
        edges = {n for n in ids if n < text[0] or n > text[-1]}
        assert {n for n in ids if n in parser.padded} == edges, \
            f"{method}: in the block of lines {ids[0]}-{ids[-1]}, hidden {sorted(parser.padded & set(ids))}, " \
            f"blank at its ends {sorted(edges)}"


def code_lines(path):
    """The line numbers of a Python file that hold code that computes: a token other than a comment, and
    not a line of a docstring (a string alone as a statement) or of a def/class header or decorator."""
    import ast
    import io
    import tokenize
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    strings = {n for node in ast.walk(tree) if isinstance(node, ast.Expr)
               and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
               for n in range(node.lineno, node.end_lineno + 1)}
    strings |= {n for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))  # headers
                for n in range(min([node.lineno] + [d.lineno for d in node.decorator_list]), node.body[0].lineno)}
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    return {n for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type not in skip
            for n in range(tok.start[0], tok.end[0] + 1)} - strings


@pytest.mark.parametrize("method", existing_methods())
def test_each_equation_links_the_code_lines_that_compute_it(method, site):
    """Every displayed equation of a method page lists the lines that compute it (from its `implements`
    marker), apart from the lines that only cite it; the computing lines are code, not comments or
    docstrings, and at most a function's worth (16). An equation the code does not compute says so
    (<!-- not-computed N -->) and lists no computing line."""
    page = built(site, method).read_text(encoding="utf-8")
    code = code_lines(ROOT / f"{method}.py")
    found = re.findall(r'<div class="eq" id="([^"]+)">.*?<p class="eq-lines" data-computed="([\d ]*)" '
                       r'data-cited="([\d ]*)">(.*?)</p>', page, re.DOTALL)
    assert found and len(found) == page.count('<div class="eq" '), f"{method}: an equation without its list of lines"
    for eq, computed, cited, said in found:
        computed, cited = [int(n) for n in computed.split()], [int(n) for n in cited.split()]
        if not computed:
            assert said.startswith("not computed in"), f"{method}: #{eq} links no line that computes it"
            continue
        assert said.startswith(f"computed in {method}.py"), f"{method}: #{eq}: {said[:80]}"
        not_code = [n for n in computed if n not in code]
        assert not not_code, f"{method}: #{eq} lists as computing it lines that are not code: {not_code}"
        assert len(computed) <= 16, f"{method}: #{eq} links {len(computed)} lines, more than a function's worth"
        assert not set(computed) & set(cited), f"{method}: #{eq}: a line both computes and only cites it"
        links = {int(n) for n in re.findall(r'class="eq-computed" href="#L(\d+)"', said)}
        assert links and links <= set(computed) and min(computed) in links, f"{method}: #{eq}: {said[:120]}"


@pytest.mark.parametrize("method", existing_methods())
def test_equations_and_lines_point_at_each_other(method, site):
    """Every displayed equation of a method page has an anchor and links to the lines that implement it;
    every `Eq. N`, `§`, `Alg.`, `App.`, `Table`, `Fig.` in the code shown is a link to a target on the page."""
    page = built(site, method).read_text(encoding="utf-8")
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    displays = re.findall(r'(<div class="eq" id="[^"]+">)?<div class="arithmatex">\\\[', page)
    assert displays and all(displays), f"{method}: a displayed equation without its anchor"
    found = re.findall(r'<div class="eq" id="([^"]+)">.*?<p class="eq-lines"[^>]*>(.*?)</p>', page, re.DOTALL)
    assert len(found) == len(displays), f"{method}: a displayed equation without its list of lines"
    for eq, lines in found:
        targets = re.findall(r'href="#(L\d+)"', lines)
        assert targets or lines.startswith("not computed"), f"{method}: #{eq} lists no line"
        assert set(targets) <= ids, f"{method}: #{eq} lists a line not on the page"
    parser = code_shown(site, method)
    for start, _, parts, _ in parser.blocks:
        for kind, data in parts:
            for ref in parser.REF.findall(data) if kind == "text" else []:
                raise AssertionError(f"{method}: '{ref}' in the block at line {start} links nowhere")
    assert parser.links, f"{method}: the code cites nothing from the paper"
    missing = [h for h in parser.links if not h.startswith("#") or h[1:] not in ids]
    assert not missing, f"{method}: references in the code link to {missing}, which are not on the page"


PROCESS = re.compile(r"paper PDF|text copy|was lent|not (?:yet )?checked|checked here|this session|/tmp/|\.\./shared/",
                     re.IGNORECASE)


def test_the_pages_speak_of_the_methods_and_the_project_only(site):
    """No note of how a page was made, and no path of the machine it was made on, in any built page
    (generated content included: README sections, the report)."""
    for page in sorted(site.glob("*.html")):
        parser = _Tags()
        parser.feed(page.read_text(encoding="utf-8"))
        text = "".join(parser.text) + "".join(parser.code)
        found = sorted({m[0] for m in PROCESS.finditer(text)})
        assert not found, f"{page.name}: {found}"


def test_test_names_cited_in_the_docs_exist():
    for name, text in pages().items():
        for path, test in re.findall(r"(tests/\w+\.py)::(\w+)", text):
            assert (ROOT / path).is_file(), f"docs/{name} cites {path}, which does not exist"
            assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.MULTILINE), f"docs/{name}: no {path}::{test}"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hooks_generate_from_the_real_files(site):
    hooks = load_hooks()
    diff = hooks.diff("mocov1.py", "mocov2.py").splitlines()
    assert diff[:3] == ["````diff", "--- mocov1.py", "+++ mocov2.py"] and diff[-1] == "````"
    assert any(line.startswith("@@") for line in diff) and any(line.startswith("+ ") for line in diff)
    table = hooks.args_table("mocov1.py").splitlines()
    assert table[0].startswith("| flag | CIFAR-10 default | `--dataset imagenet` |")
    assert any(row.startswith("| `--tau` | ") for row in table)
    assert any(row.startswith("| `--arch` | `\"resnet18\"` | **`\"resnet50\"`** |") for row in table)
    api = built(site, "api").read_text()
    assert 'id="common.dist.gather_with_grad"' in api and "gradients summed over" in api
    mocov2 = built(site, "mocov2").read_text()
    assert '<span class="gd">--- mocov1.py</span>' in mocov2 and '<span class="gi">+++ mocov2.py</span>' in mocov2


def run_hooks(hooks, markdown, content):
    """The page hooks on a page that annotates mocov1.py: its markdown, then `content` as its HTML (the
    annotated blocks' placeholders are kept: `content` is appended to them)."""
    class Page:
        url = "x.html"

        class file:
            src_uri = "x.md"
    out = hooks.on_page_markdown(markdown, Page(), config={})
    placeholders = "".join(re.findall(r'<div class="ann-code" data-block="\d+"></div>', out))
    return hooks.on_page_content(placeholders + content, Page(), config={})


EQ = '<div class="arithmatex">\\[ q \\cdot k \\tag{1} \\]</div>'


@pytest.mark.parametrize("marker, warning", [
    ("", "no code line of mocov1.py computes Eq. 1"),
    ('<!-- implements 1 "Eq. 1: L_q" -->', "only in comments, docstrings"),  # the docstring of info_nce
    ('<!-- implements 1 "q·k₊" -->', "only in comments, docstrings"),  # a trailing comment
    ('<!-- implements 1 "no such text" -->', "no line of mocov1.py contains"),
    ('<!-- implements 1 "def info_nce" -->', "not in code that computes"),  # a header names, computes nothing
    ('<!-- implements 1 "q" -->', "more than a function's worth"),
    ('<!-- implements 1 "l_pos =" -->\n<!-- not-computed 1 -->', "marked not-computed"),
    ('<!-- implements 7 "l_pos =" -->\n<!-- implements 1 "l_pos =" -->', "names Eq. 7, which no display"),
])
def test_an_equation_without_a_computing_line_is_a_warning(caplog, marker, warning):
    """Each way an equation can fail to link the code that computes it warns, which fails the strict build."""
    hooks = load_hooks()
    markdown = f"{marker}\n<!-- annotate mocov1.py -->\nall\n<!-- code -->\n<!-- end annotate -->\n"
    with caplog.at_level(logging.WARNING):
        run_hooks(hooks, markdown, EQ)
    assert warning in caplog.text, caplog.text


def test_computing_lines_are_listed_apart_from_citing_lines(caplog):
    hooks = load_hooks()
    text = (ROOT / "mocov1.py").read_text(encoding="utf-8").splitlines()
    number = lambda s: next(n for n, line in enumerate(text, 1) if s in line)
    markdown = ('<!-- implements 1 "l_pos = (q * k)" "l_neg = q @ queue" "logits = torch.cat" "return F.cross_entropy" -->\n'
                "<!-- annotate mocov1.py -->\nall\n<!-- code -->\n<!-- end annotate -->\n")
    with caplog.at_level(logging.WARNING):
        out = run_hooks(hooks, markdown, EQ)
    about = [r.message for r in caplog.records if "Eq. 1" in r.message or "implements" in r.message]
    assert not about, about  # (the others: the code's § references, which this bare page does not list)
    m = re.search(r'data-computed="([\d ]*)" data-cited="([\d ]*)"', out)
    computed, cited = [int(n) for n in m[1].split()], [int(n) for n in m[2].split()]
    assert computed == list(range(number("l_pos = (q * k)"), number("return F.cross_entropy") + 1))
    assert number("def info_nce(") + 1 in cited and not set(computed) & set(cited)  # its docstring cites Eq. 1


def test_a_marker_naming_a_missing_file_is_a_warning(caplog):
    """A warning is what makes `mkdocs build --strict` fail."""
    class Page:
        class file:
            src_uri = "x.md"
    hooks = load_hooks()
    with caplog.at_level(logging.WARNING):
        out = hooks.on_page_markdown("text\n<!-- diff mocov1.py nothere.py -->\n", Page(), config={})
    assert "nothere.py does not exist" in caplog.text and "failure" in out


class _Tags(html.parser.HTMLParser):
    """script src, link href, and the text a reader sees outside code and KaTeX's hidden MathML."""

    HIDDEN = frozenset({"script", "style", "annotation", "noscript"})

    def __init__(self):
        super().__init__()
        self.urls, self.text, self.code, self.classes = [], [], [], []
        self._stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href") and a.get("rel") not in ("canonical", "prev", "next"):
            self.urls.append(a["href"])
        classes = (a.get("class") or "").split()
        self.classes += classes
        if tag not in ("meta", "link", "br", "img", "input", "hr", "source", "wbr"):  # no end tag
            self._stack.append((tag, classes))

    def handle_endtag(self, tag):
        if any(t == tag for t, _ in self._stack):
            while self._stack.pop()[0] != tag:
                pass

    def handle_data(self, data):
        tags = {t for t, _ in self._stack}
        classes = {c for _, cs in self._stack for c in cs}
        if tags & self.HIDDEN or "katex-mathml" in classes:
            return
        (self.code if tags & {"code", "pre"} else self.text).append(data)


def test_nothing_is_loaded_from_outside(site):
    for page in site.rglob("*.html"):
        parser = _Tags()
        parser.feed(page.read_text(encoding="utf-8"))
        outside = [u for u in parser.urls if re.match(r"(https?:)?//", u)]
        assert not outside, f"{page.relative_to(site)} loads {outside}"
    for css in site.rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", css.read_text(encoding="utf-8")), css
        assert "@import" not in css.read_text(encoding="utf-8"), css


def chromium():
    """The browser; without one the browser checks are skipped, saying how to install it, except under CI
    (CI=true), where .ci/run installs it and they must run."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    why = "Chromium is not installed: `sudo apt-get install chromium` installs it (Debian, Ubuntu)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}; under CI the browser checks must run (.ci/run installs it)")
    pytest.skip(f"{why}, and these browser checks then run")


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(type("Quiet", (http.server.SimpleHTTPRequestHandler,),
                                     {"log_message": lambda *a: None}), directory=str(site))
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"request_queue_size": 256})  # many frames
    httpd = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def browse(url, tmp_path, *flags):
    """Headless Chromium on `url` that can reach 127.0.0.1 only; returns the finished process."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=600000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *flags, url]
    p = subprocess.run(command, capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, f"{command} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p


# Every page in an iframe of each width, one page at a time; what is measured comes back as JSON in #report.
MEASURE = """<!doctype html><html><body style="margin:0"><pre id="report">pending</pre><script>
const pages = PAGES, widths = WIDTHS, found = {};
const wait = ms => new Promise(r => setTimeout(r, ms));
function measure(w, width) {
  const d = w.document, content = d.querySelector(".md-content"), out = {};
  const wide = (el, box) => el.scrollWidth - (box || el).clientWidth;
  out.page = d.documentElement.scrollWidth - d.documentElement.clientWidth;
  out.code = [...content.querySelectorAll("pre > code")].map(c => wide(c)).filter(x => x > 1);
  out.tables = [...content.querySelectorAll("table")].map(t => Math.max(wide(t),
    wide(t, t.closest(".md-typeset__scrollwrap") || t.parentElement))).filter(x => x > 1);
  out.displays = [...content.querySelectorAll(".katex-display")].map(e => wide(e)).filter(x => x > 1);
  out.scrolling_displays = [...content.querySelectorAll(".katex-display")].filter(e =>
    e.scrollWidth > e.clientWidth + 1 && !["auto", "scroll"].includes(w.getComputedStyle(e).overflowX)).length;
  out.tag_overlaps = [...content.querySelectorAll(".katex-display .katex-tag")].filter(tag => {
    const t = tag.getBoundingClientRect();
    return [...tag.parentElement.querySelectorAll(":scope > .katex-base")].some(b => {
      const r = b.getBoundingClientRect();
      return r.right > t.left + 1 && r.left < t.right - 1 && r.bottom > t.top && r.top < t.bottom;
    });
  }).length;
  out.list_paragraphs = [...content.querySelectorAll("p")].filter(p =>
    /(^|\\n)\\s*[-*+] \\S/.test(p.textContent)).map(p => p.textContent.slice(0, 80));
  out.broken = [];
  for (const code of content.querySelectorAll("td code, th code")) {
    if (code.getClientRects().length < 2) continue;  // on one line
    const chars = [], range = d.createRange(), walk = d.createTreeWalker(code, 4);  // 4: text nodes
    for (let node = walk.nextNode(); node; node = walk.nextNode())
      for (let i = 0; i < node.length; i++) {
        range.setStart(node, i); range.setEnd(node, i + 1);
        const r = range.getClientRects()[0];
        chars.push([node.data[i], r ? r.top : null]);
      }
    for (let i = 1; i < chars.length; i++)
      if (chars[i][1] !== null && chars[i - 1][1] !== null && chars[i][1] > chars[i - 1][1] + 2 &&
          /[\\w.]/.test(chars[i - 1][0]) && /[\\w.]/.test(chars[i][0]))
        out.broken.push(chars.map(c => c[0]).join("").slice(0, i) + "|" + chars.map(c => c[0]).join("").slice(i));
  }
  out.stranded = [];
  for (const m of content.querySelectorAll("span.arithmatex")) {
    const next = m.nextSibling;
    if (!next || next.nodeType !== 3 || !/^[.,;:!?)]/.test(next.textContent)) continue;
    const range = d.createRange();
    range.setStart(next, 0); range.setEnd(next, 1);
    const p = range.getBoundingClientRect(), rects = m.getClientRects(), last = rects[rects.length - 1];
    if (last && p.top > last.bottom - 2) out.stranded.push(m.textContent.slice(0, 40) + next.textContent[0]);
  }
  out.math = content.querySelectorAll(".arithmatex").length;
  out.katex = content.querySelectorAll(".katex").length;
  out.katex_errors = content.querySelectorAll(".katex-error").length;
  out.tags = content.querySelectorAll(".katex .katex-tag").length;
  const visible = content.cloneNode(true);
  visible.querySelectorAll(".katex-mathml, pre, code, script").forEach(e => e.remove());
  out.raw_tex = ["$$", "\\\\(", "\\\\[", "\\\\frac", "\\\\tag", "\\\\mathcal", "\\\\operatorname"].filter(t =>
    visible.textContent.includes(t));
  const box = content.getBoundingClientRect();
  out.diagrams = [...content.querySelectorAll("figure.diagram img")].map(img => {
    const r = img.getBoundingClientRect();
    return {loaded: img.complete && (img.naturalWidth > 0 || img.dataset.decoded > 0), width: r.width, height: r.height,
            inside: r.left >= box.left - 1 && r.right <= box.right + 1};
  });
  out.code_blocks = content.querySelectorAll(".ann-code").length;
  // the walk-through's rows, side by side: [commentary width, code width] of each
  out.columns = [...content.querySelectorAll(".ann-row")].map(row => {
    const note = row.querySelector(".ann-note").getBoundingClientRect();
    const code = row.querySelector(".ann-code").getBoundingClientRect();
    return code.left >= note.right - 1 ? [Math.round(note.width), Math.round(code.width)] : null;
  }).filter(x => x);
  // a name of the code drawn on two lines (a line wraps between tokens only)
  out.broken_names = [...content.querySelectorAll(".ann-line span")].filter(t =>
    /^(n|n[a-z]|bp|m[a-z]?|k[a-z]?)$/.test(t.className) && /\\w\\w/.test(t.textContent) &&
    t.getClientRects().length > 1).map(t => t.textContent).slice(0, 5);
  // a block whose first or last line shown is blank
  out.padded = [...content.querySelectorAll(".ann-code pre")].filter(pre => {
    const shown = [...pre.querySelectorAll(".ann-line")].filter(l => l.getClientRects().length);
    return shown.length && (!shown[0].textContent.trim() || !shown[shown.length - 1].textContent.trim());
  }).length;
  return out;
}
async function one(page) {
  const frames = widths.map(width => {
    const f = document.createElement("iframe");
    f.width = width; f.height = 700; f.src = page;
    f.style.cssText = "border: 0; position: absolute; left: 0; top: 0";  // all in view: nothing deferred
    document.body.appendChild(f);
    return new Promise(resolve => f.onload = () => resolve(f));
  });
  const loaded = await Promise.all(frames);
  for (let i = 0; i < 50; i++) {  // until KaTeX has rendered every formula
    const d = loaded[0].contentDocument;
    if (d.querySelectorAll(".arithmatex").length <= d.querySelectorAll(".katex").length) break;
    await wait(100);
  }
  for (const f of loaded)  // each image decoded, and its file decoded once more on its own: the size of an
    await Promise.all([...f.contentDocument.images].map(async i => {  // SVG in a busy frame can read 0
      await i.decode().catch(() => null);
      const probe = new f.contentWindow.Image();
      probe.src = i.currentSrc;
      i.dataset.decoded = await probe.decode().then(() => probe.naturalWidth, () => 0);
    }));
  await wait(200);
  found[page] = {};
  loaded.forEach((f, i) => { found[page][widths[i]] = measure(f.contentWindow, widths[i]); f.remove(); });
}
async function run() {
  for (let i = 0; i < pages.length; i += 3) await Promise.all(pages.slice(i, i + 3).map(one));
  document.getElementById("report").textContent = JSON.stringify(found);
}
run().catch(e => document.getElementById("report").textContent = "error: " + e);
</script></body></html>"""


@pytest.fixture(scope="module")
def measured(site, server, tmp_path_factory):
    """Every page of the site at every width, measured in one Chromium session (once per session)."""
    names = sorted(n.removesuffix(".md") + ".html" for n in pages())

    def measure(path):
        (site / "measure.html").write_text(MEASURE.replace("PAGES", json.dumps(names)).replace("WIDTHS", json.dumps(WIDTHS)))
        dom = browse(f"{server}/measure.html", tmp_path_factory.mktemp("chromium"), "--window-size=1500,900",
                     "--dump-dom").stdout
        report = html.unescape(re.search(r'<pre id="report">(.*?)</pre>', dom, re.DOTALL)[1])
        assert report != "pending" and not report.startswith("error"), f"the pages were not measured: {report[:300]}"
        path.write_text(report)
    found = json.loads(once(tmp_path_factory, "measured.json", measure).read_text())
    assert sorted(found) == names
    return found


def has_maths(markdown):
    prose = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", markdown, flags=re.DOTALL | re.MULTILINE)  # fenced code
    return "$" in re.sub(r"`[^`\n]*`", "", prose)  # inline code


MATH_PAGES = [name.removesuffix(".md") for name, text in sorted(pages().items()) if has_maths(text)]


def failures(measured, check):
    """[(page, width, what)] where `check(width, numbers)` returns something."""
    return [(page, width, what) for page, by_width in sorted(measured.items())
            for width, numbers in by_width.items() if (what := check(int(width), numbers))]


def test_chromium_renders_the_maths(measured):
    bad = failures(measured, lambda w, m: w == 1440 and (
        m["katex"] < m["math"] and "unrendered" or m["katex_errors"] and "KaTeX errors" or m["raw_tex"]))
    assert not bad, f"maths not rendered (page, width, what): {bad}"
    for page in MATH_PAGES:
        numbers = measured[f"{page}.html"]["1440"]
        source = (DOCS / f"{page}.md").read_text(encoding="utf-8")
        assert numbers["math"] > 0 and numbers["tags"] >= source.count("\\tag{"), f"{page}: maths or numbers missing"


def test_nothing_scrolls_the_page_sideways_at_any_width(measured):
    """The page never; at 1024 px and wider no code block, table or displayed equation is wider than its box."""
    bad = failures(measured, lambda w, m: (m["page"] > 1 and f"page {m['page']} px too wide") or (w >= 1024 and {
        k: m[k] for k in ("code", "tables", "displays") if m[k]}))
    assert not bad, f"(page, width, what is wider than its box and by how many px): {bad}"


def test_displayed_equations_scroll_in_their_own_box_and_their_number_never_covers_them(measured):
    bad = failures(measured, lambda w, m: (m["tag_overlaps"] and f"{m['tag_overlaps']} numbers over their formula")
                   or (m["scrolling_displays"] and f"{m['scrolling_displays']} wide displays that cannot scroll"))
    assert not bad, f"(page, width, what): {bad}"


def test_no_list_rendered_as_a_paragraph(measured):
    bad = failures(measured, lambda w, m: w == 1440 and m["list_paragraphs"])
    assert not bad, f"paragraphs with literal list items (a missing blank line in the markdown): {bad}"


def test_no_identifier_broken_in_a_table_and_no_punctuation_stranded_after_maths(measured):
    bad = failures(measured, lambda w, m: m["broken"] and f"broken: {m['broken'][:3]}")
    bad += failures(measured, lambda w, m: w >= 1024 and m["stranded"] and f"stranded: {m['stranded'][:3]}")
    assert not bad, f"(page, width, what): {bad}"


def test_each_method_page_shows_its_diagram_and_its_code_beside_the_commentary(measured):
    for method in existing_methods():
        for width, numbers in measured[f"{method}.html"].items():
            assert numbers["code_blocks"] >= 5, f"{method} at {width} px: the walk-through is missing"
            diagrams = numbers["diagrams"]
            assert len(diagrams) == 1, f"{method} at {width} px: {len(diagrams)} diagrams"
            d = diagrams[0]
            assert d["loaded"] and d["width"] > 100 and d["height"] > 50 and d["inside"], f"{method} at {width}: {d}"


def test_the_code_pane_shows_the_file_only_and_is_as_wide_as_the_commentary(measured):
    """On the method pages: no name of the code broken across two lines at any width, no block padded with
    blank lines, and at 1280 and 1440 px the code column at least as wide as the commentary beside it."""
    bad = failures(measured, lambda w, m: m["broken_names"] and f"names broken: {m['broken_names']}")
    bad += failures(measured, lambda w, m: m["padded"] and f"{m['padded']} blocks shown with a blank first or last line")
    for method in existing_methods():
        for width in (1280, 1440):
            columns = measured[f"{method}.html"][str(width)]["columns"]
            assert columns, f"{method} at {width} px: the commentary and the code are not side by side"
            narrow = [(note, code) for note, code in columns if code < note]
            bad += [(method, width, f"code narrower than the commentary: {narrow[:3]}")] if narrow else []
    assert not bad, f"(page, width, what): {bad}"


def test_the_site_opened_from_disk_navigates_and_searches(site, tmp_path):
    """file://: every link of the navigation is a page on disk (no directory listing), the maths renders,
    and the search finds a word."""
    index = site / "index.html"
    dom = browse(f"{index.as_uri()}?q=momentum", tmp_path, "--window-size=1440,900", "--dump-dom").stdout
    links = set(re.findall(r'class="md-nav__link[^"]*"[^>]*href="([^"#]+)"|href="([^"#]+)"[^>]*class="md-nav__link',
                           dom))
    targets = {a or b for a, b in links}
    assert len(targets) >= len(existing_methods()), f"no navigation found in {index}"
    for href in targets:
        target = (index.parent / html.unescape(href)).resolve()
        assert target.is_file(), f"the navigation links {href}, which is not a page on disk"
    results = re.findall(r'class="md-search-result__item"', dom)
    meta = re.search(r'class="md-search-result__meta"[^>]*>(.*?)<', dom, re.DOTALL)
    assert results, f"search from disk found nothing for 'momentum' ({meta[1].strip() if meta else 'no search'})"
    page = browse((site / "simsiam.html").as_uri(), tmp_path, "--dump-dom").stdout
    assert 'class="katex' in page and 'class="ann-code"' in page, "simsiam.html from disk: maths or code missing"
