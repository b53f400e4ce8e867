"""The documentation site: `mkdocs build --strict`, snippet sections paired and shown, one page per
method in the nav, content generated from the real files, nothing loaded from outside, and the
equations and code rendered in headless Chromium."""
import functools
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

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]
METHOD_HEADINGS = ["## Objective", "## Walkthrough", "## Hyper-parameters", "## Deviations from the paper",
                   "## Multi-GPU", "## Logged metrics", "## Results", "## Diff against"]
MARKER = re.compile(r"#\s*--8<--\s*\[(start|end):([a-z][-_0-9a-z]*)\]")
INCLUDE = re.compile(r'--8<--\s*"([^":]+):([a-z][-_0-9a-z]*)"')


def existing_methods():
    return [m for m in METHODS if (ROOT / f"{m}.py").is_file()]


def pages():
    return {p.relative_to(DOCS).as_posix(): p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}


def sections(path):
    """{name: (start line, end line)} of the snippet sections of a file; fails on unpaired markers."""
    found, open_ = {}, {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for kind, name in MARKER.findall(line):
            where = f"{path.name}:{i}"
            if kind == "start":
                assert name not in open_ and name not in found, f"{where}: section '{name}' starts twice"
                open_[name] = i
            else:
                assert name in open_, f"{where}: section '{name}' ends without a start"
                found[name] = (open_.pop(name), i)
    assert not open_, f"{path.name}: sections never ended: {sorted(open_)}"
    return found


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The site built with `mkdocs build --strict` into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    p = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if "No module named mkdocs" in p.stderr:
        pytest.fail("mkdocs is not installed: `uv sync` (the test group includes the docs group)")
    assert p.returncode == 0, f"mkdocs build --strict failed:\n{p.stdout}\n{p.stderr}"
    return out


def test_strict_build_writes_every_page(site):
    for name in pages():
        html_path = site / ("index.html" if name == "index.md" else name.removesuffix(".md") + "/index.html")
        assert html_path.is_file(), f"docs/{name} was not built"


def test_snippet_sections_are_paired_unique_and_shown():
    included = {(f, s) for text in pages().values() for f, s in INCLUDE.findall(text)}
    for f, s in sorted(included):
        assert (ROOT / f).is_file() and s in sections(ROOT / f), f"a page includes {f}:{s}, which does not exist"
    for path in sorted(ROOT.glob("*.py")):
        for name in sections(path):
            assert (path.name, name) in included, f"section '{name}' of {path.name} is on no page of docs/"


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
    """The headings of docs/simsiam.md in order, every section of the file shown on its own page,
    and the paper's equations numbered."""
    page = DOCS / f"{method}.md"
    assert page.is_file(), f"docs/{method}.md is missing"
    text = page.read_text(encoding="utf-8")
    positions = [text.find("\n" + h) for h in METHOD_HEADINGS]
    missing = [h for h, p in zip(METHOD_HEADINGS, positions) if p < 0]
    assert not missing, f"docs/{method}.md lacks the headings {missing}"
    assert positions == sorted(positions), f"docs/{method}.md: headings not in the order {METHOD_HEADINGS}"
    shown = {s for f, s in INCLUDE.findall(text) if f == f"{method}.py"}
    assert set(sections(ROOT / f"{method}.py")) <= shown, f"docs/{method}.md does not show every section"
    assert "\\tag{" in text, f"docs/{method}.md numbers no equation with the paper's number (\\tag{{...}})"


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
    api = (site / "api" / "index.html").read_text()
    assert 'id="common.dist.gather_with_grad"' in api and "gradients summed over" in api
    mocov2 = (site / "mocov2" / "index.html").read_text()
    assert '<span class="gd">--- mocov1.py</span>' in mocov2 and '<span class="gi">+++ mocov2.py</span>' in mocov2


def test_a_marker_naming_a_missing_file_is_a_warning(caplog):
    """A warning is what makes `mkdocs build --strict` fail."""
    class Page:
        class file:
            src_uri = "x.md"
    hooks = load_hooks()
    with caplog.at_level(logging.WARNING):
        out = hooks.on_page_markdown("text\n<!-- diff mocov1.py nothere.py -->\n", Page())
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
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def browse(url, tmp_path, *flags):
    """Headless Chromium on `url` that can reach 127.0.0.1 only; returns the finished process."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *flags, url]
    p = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{command} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p


def has_maths(markdown):
    prose = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", markdown, flags=re.DOTALL | re.MULTILINE)  # fenced code
    return "$" in re.sub(r"`[^`\n]*`", "", prose)  # inline code


MATH_PAGES = [name.removesuffix(".md") for name, text in sorted(pages().items()) if has_maths(text)]


@pytest.mark.parametrize("page", MATH_PAGES)
def test_chromium_renders_the_equations_and_the_code(page, site, server, tmp_path):
    source = (DOCS / f"{page}.md").read_text(encoding="utf-8")
    dom = browse(f"{server}/{'' if page == 'index' else page + '/'}", tmp_path, "--dump-dom").stdout
    parser = _Tags()
    parser.feed(dom)
    classes, text = parser.classes, "".join(parser.text)
    assert classes.count("arithmatex") > 0, f"{page}: no maths found in the page"
    assert classes.count("katex") >= classes.count("arithmatex"), f"{page}: some maths was not rendered by KaTeX"
    assert "katex-error" not in classes, f"{page}: KaTeX could not parse some TeX"
    assert classes.count("katex-tag") >= source.count("\\tag{"), f"{page}: equation numbers missing"
    raw = [t for t in ("$$", "\\(", "\\[", "\\frac", "\\tag", "\\mathcal", "\\operatorname", "\\lVert") if t in text]
    assert not raw, f"{page}: raw TeX {raw} left in the visible text"
    if (ROOT / f"{page}.py").is_file():  # a method page shows its loss function, from the file
        lines = (ROOT / f"{page}.py").read_text(encoding="utf-8").splitlines()
        start, end = sections(ROOT / f"{page}.py")["loss"]
        loss = re.search(r"^def (\w+)\(", "\n".join(lines[start:end - 1]), re.MULTILINE)
        assert loss, f"{page}.py: no function in its loss section"
        assert f"def {loss[1]}(" in "".join(parser.code), f"{page}: the code of {loss[1]} is not on the page"


def test_chromium_screenshot_of_a_method_page(site, server, tmp_path):
    shot = tmp_path / "simsiam.png"
    browse(f"{server}/simsiam/", tmp_path, f"--screenshot={shot}", "--window-size=1280,2400")
    assert shot.is_file() and shot.stat().st_size > 50_000, "no screenshot (or a blank one)"


OVERFLOW_CHECK = """<!doctype html><html><body><pre id="overflow">pending</pre><script>
// Each method page in a 1440-px-wide frame: the scroll and client widths of its code blocks and tables.
const pages = PAGES, found = {};
let left = pages.length;
for (const page of pages) {
  const frame = document.createElement("iframe");
  frame.width = 1440; frame.height = 900; frame.src = page + "/";
  frame.onload = () => setTimeout(() => {
    const d = frame.contentDocument;
    const measure = (el, box) => [el.scrollWidth, box.clientWidth];
    found[page] = {
      code: [...d.querySelectorAll(".md-content pre > code")].map(c => measure(c, c)),
      tables: [...d.querySelectorAll(".md-content table")].map(t => measure(t, t.closest(".md-typeset__scrollwrap") || t.parentElement)),
    };
    if (--left === 0) document.getElementById("overflow").textContent = JSON.stringify(found);
  }, 500);
  document.body.appendChild(frame);
}
</script></body></html>"""


def test_method_pages_fit_a_1440_px_window_without_sideways_scrolling(site, server, tmp_path):
    """No code block (lines of up to 120 characters) or table of a method page is wider than its box."""
    methods = existing_methods()
    (site / "overflow-check.html").write_text(OVERFLOW_CHECK.replace("PAGES", json.dumps(methods)))
    dom = browse(f"{server}/overflow-check.html", tmp_path, "--dump-dom").stdout
    report = re.search(r'<pre id="overflow">(.*?)</pre>', dom, re.DOTALL)[1]
    assert report != "pending", "the method pages did not load in time"
    found = json.loads(html.unescape(report))
    assert sorted(found) == sorted(methods)
    for page, boxes in found.items():
        assert len(boxes["code"]) >= 4, f"{page}: its code blocks were not found"
        wide = {kind: [(i, s, c) for i, (s, c) in enumerate(sizes) if s > c] for kind, sizes in boxes.items()}
        assert not any(wide.values()), f"{page} at 1440 px: (index, content width, box width) too wide: {wide}"
