"""mkdocs hooks: page content generated at build time from the real files at the repository root.

A page asks for generated content with an HTML comment alone on a line:

    <!-- diff mocov1.py mocov2.py -->    unified diff of two files (difflib), as a ```diff block
    <!-- args simsiam.py -->             hyper-parameter table from the file's `Args` and `PRESETS`
    <!-- api common -->                  signatures and docstrings of every module in common/
    <!-- measured simsiam -->            the rows of README.md's "Measured" table for one method
    <!-- measured -->                    (or all of them)
    <!-- readme TITLE -->                the text of README.md's section "## TITLE"

and a method page walks its whole file, block by block, each block beside its commentary:

    <!-- annotate simsiam.py [changed-from mocov1.py] -->
    commentary of the first block (markdown: prose, $$ equations $$, lists)
    <!-- code -->                        the first block: from the line after the module docstring
    commentary of the next block
    <!-- code "def D(" -->               the next block starts at the first line after the previous
    ...                                  block's start that contains this text (or at the decorators
                                         right above that line): the code's own text, a `def`, a
                                         `class`, a distinct line; the files carry no build markers
    <!-- end annotate -->                the last block runs to the end of the file

The blocks tile the file: every line after the docstring is on the page once, in order, with its own
line number; the blank lines at either end of a block are kept but hidden (`ann-pad`). A long line
wraps between tokens (a <wbr> after each operator and punctuation token), never inside a name.
`changed-from` marks the lines that differ from another file. In the code shown, `Eq. N` links to the
display on the page whose \\tag is N, and every other reference to the paper (`§3.3`, `App. D`,
`Alg. 1`, `Table 6`, `MoCo v2 §3`, ...) to the item of the list under `<!-- cited -->` that starts
with it in bold. Each display `$$ ... \\tag{N} $$` gets the anchor `eq-N` and, under it, two lists:

    <!-- implements N "text" "text" -->  the lines that COMPUTE Eq. N: every line whose code (the line
                                         without its comment; never a docstring, a `def` or `class`
                                         header, a decorator) contains one of the texts: the loss
                                         body, the update, the schedule
    (automatic)                          the lines that only cite it: `Eq. N` in a comment or docstring
    <!-- not-computed N -->               instead of `implements`: a display the code does not compute
                                         (shown for the argument); it lists no computing line

A block's first lines that are headings (`### Loss`) stand above the row, full width.

Everything is read with `ast` and `tokenize`, never imported, so the build needs neither torch nor a
GPU. Each of these logs a warning, which fails `mkdocs build --strict`: a marker that names a missing
file or cannot be generated; a reference without its target; an equation with no computing line (and no
`not-computed`); an `implements` text found in no line, or only in comments and docstrings; an equation
whose computing lines are more than a function's worth (MAX_COMPUTING_LINES); a marker naming an equation
that no display carries.
"""
import ast
import difflib
import html
import io
import posixpath
import re
import tokenize
from pathlib import Path

from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File
from pygments.lexers import PythonLexer
from pygments.token import STANDARD_TYPES, Comment, Operator, Punctuation, String

log = get_plugin_logger("docs-hooks")
ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^([ \t]*)<!--\s*(diff|args|api|measured|readme|clone)\b\s*([^>]*?)\s*-->[ \t]*$", re.MULTILINE)
API_ORDER = ["cli", "dist", "data", "resnet", "train", "optim", "evaluate", "linear", "knn", "report", "bench"]
METHOD_FILES = ["mocov1.py", "mocov2.py", "simclr.py", "byol.py", "simsiam.py", "barlow.py", "vicreg.py", "unigrad.py"]
SOURCE_DIR = "src"  # each method file is copied to the site as src/NAME.py, the target of the code's file links

ANNOTATE = re.compile(r"^<!--\s*annotate\s+(\S+)(?:\s+changed-from\s+(\S+))?\s*-->[ \t]*\n(.*?)^<!--\s*end annotate\s*-->[ \t]*$",
                      re.MULTILINE | re.DOTALL)
CODE = re.compile(r'^<!--\s*code(?:\s+"([^"]+)")?\s*-->[ \t]*$', re.MULTILINE)
IMPLEMENTS = re.compile(r"^<!--\s*implements\s+(\S+)((?:\s+\"[^\"]+\")+)\s*-->[ \t]*$", re.MULTILINE)
NOT_COMPUTED = re.compile(r"^<!--\s*not-computed\s+(\S+)\s*-->[ \t]*$", re.MULTILINE)
PAPERS = r"MoCo v1|MoCo v2|MoCo|SimCLR|BYOL|SimSiam|Barlow Twins|VICReg|UniGrad"
REF = re.compile(rf"(?:\b(?P<paper>{PAPERS})(?:'s)? )?(?P<ref>Eqs?\. \d+(?:(?:, | and | or )\d+\b)*|§ ?\d+(?:\.\d+)*|"
                 r"App\. [A-Z](?:\.\d+)?\b|Alg\. \d+|Table \d+|Fig\. \d+)")
STATE = {}  # per page (src_uri): the annotated file, its blocks and the `implements` markers


def on_files(files, config, **kwargs):
    """Each method file, copied into the site (src/NAME.py): the file the code blocks link to."""
    for name in METHOD_FILES:
        if (ROOT / name).is_file():
            files.append(File.generated(config, f"{SOURCE_DIR}/{name}", content=_source(name)))
    return files


def on_page_markdown(markdown, page, config, **kwargs):
    def replace(m):
        indent, kind, operands = m[1], m[2], m[3]
        try:
            text = {"diff": diff, "args": args_table, "api": api, "measured": measured, "readme": readme,
                    "clone": lambda: clone(config.get("repo_url"))}[kind](*operands.split())
        except Exception as e:  # a warning: `mkdocs build --strict` fails, `mkdocs serve` keeps going
            log.warning(f"{page.file.src_uri}: cannot expand <!-- {kind} {operands} -->: {type(e).__name__}: {e}")
            text = f"!!! failure \"{kind} {operands}: {type(e).__name__}\"\n    {e}\n"
        return "".join(indent + line if line.strip("\r\n") else line for line in text.splitlines(keepends=True))
    markdown = MARKER.sub(replace, markdown)
    state = STATE[page.file.src_uri] = {"file": None, "blocks": [], "implements": {}, "not_computed": set()}
    for m in IMPLEMENTS.finditer(markdown):
        state["implements"].setdefault(m[1], []).extend(re.findall(r'"([^"]+)"', m[2]))
    state["not_computed"] = set(NOT_COMPUTED.findall(markdown))
    markdown = NOT_COMPUTED.sub("", IMPLEMENTS.sub("", markdown))
    try:
        return ANNOTATE.sub(lambda m: annotate(page, state, m[1], m[2], m[3]), markdown)
    except Exception as e:
        log.warning(f"{page.file.src_uri}: cannot annotate: {type(e).__name__}: {e}")
        return markdown


def on_page_content(content, page, config, **kwargs):
    """The generated code placed, equations anchored and tied to their lines, references linked, and
    inline maths kept on one line with the punctuation that follows it."""
    state = STATE.get(page.file.src_uri, {"file": None})
    where = page.file.src_uri
    cited = {}  # anchor: text of the item, for the links' tooltips
    m = re.search(r"<!--\s*cited\s*-->\s*<ul>(.*?)</ul>", content, re.DOTALL)
    if m:
        def item(li):
            key = _slug("ref", re.sub(r"\s+", " ", html.unescape(li[1])).strip())
            cited[key] = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", li[0]))).strip()
            return f'<li id="{key}">{li[0][4:]}'
        items = re.sub(r"<li><strong>(.*?)</strong>.*?</li>", item, m[1], flags=re.DOTALL)
        content = content[:m.start(1)] + items + content[m.end(1):]
    equations = {}
    if state["file"]:
        def anchor(d):
            tag = re.search(r"\\tag\*?\{(.*?)\}", d[2])
            if not tag:
                log.warning(f"{where}: a displayed equation has no \\tag, so no anchor: {d[2][:80]!r}")
                return d[0]
            key = tag[1].strip()
            equations[key] = _slug("eq", key)
            computed, cited = _implementing(state, key, where)
            name = html.escape(state["file"])
            if key in state["not_computed"]:
                if computed:
                    log.warning(f"{where}: Eq. {key} is marked not-computed, yet <!-- implements {key} --> names lines")
                said = f"not computed in {name}"
            else:
                if not computed:
                    log.warning(f"{where}: no code line of {state['file']} computes Eq. {key} (add <!-- implements {key} "
                                f"\"text\" --> naming the lines that compute it, or <!-- not-computed {key} --> if the "
                                f"code does not compute it)")
                said = f"computed in {name}, {_line_links(computed, 'eq-computed')}" if computed else ""
            if cited:
                said += f'<span class="eq-cited">{"; " if said else ""}cited at {_line_links(cited, "eq-cited")}</span>'
            return (f'<div class="eq" id="{_slug("eq", key)}">{d[1]}<p class="eq-lines" '
                    f'data-computed="{" ".join(map(str, computed))}" data-cited="{" ".join(map(str, cited))}">'
                    f'{said}</p></div>')
        content = re.sub(r'(<div class="arithmatex">(.*?)</div>)', anchor, content, flags=re.DOTALL)
        for key in sorted((set(state["implements"]) | state["not_computed"]) - set(equations)):
            log.warning(f"{where}: a marker names Eq. {key}, which no display on the page carries (\\tag{{{key}}})")
        text = _source(state["file"])
        changed = _changed_lines(text, _source(state["changed_from"])) if state.get("changed_from") else set()
        lines = _highlight(text, lambda ref: _link(ref, equations, cited, where))
        files_url = posixpath.relpath(f"{SOURCE_DIR}/{state['file']}", posixpath.dirname(page.url) or ".")
        repo = (config.get("repo_url") or "").rstrip("/")
        content = re.sub(r'<div class="ann-code" data-block="(\d+)"></div>',
                         lambda b: _listing(state["file"], lines, *state["blocks"][int(b[1])], changed, files_url, repo),
                         content)
    # in tables, a path in inline code may break after a "/" (never inside a name)
    content = re.sub(r"<table>.*?</table>", lambda t: re.sub(
        r"<code>([^<]*)</code>", lambda c: "<code>" + c[1].replace("/", "/<wbr>") + "</code>", t[0]),
        content, flags=re.DOTALL)
    # inline maths and the punctuation after it on one line
    content = re.sub(r'(<span class="arithmatex">(?:(?!</span>).){0,120}</span>)([.,;:!?)\]]+)',
                     r'<span class="nowrap">\1\2</span>', content, flags=re.DOTALL)  # a long formula may wrap
    return content


def _slug(kind, key):
    return f"{kind}-" + re.sub(r"[^a-z0-9]+", "-", key.lower().replace("§", "s").replace("'", "p")).strip("-")


def _refs(text):
    """[(match, paper, ref, [equation numbers])] of the references to a paper in a text."""
    out = []
    for m in REF.finditer(text):
        ref = re.sub(r"\s+", " ", m["ref"]).replace("§ ", "§")
        numbers = re.findall(r"\d+", ref) if ref.startswith("Eq") and not m["paper"] else []
        out.append((m, m["paper"], ref, numbers))
    return out


def _code_lines(text):
    """{line number: the line's code}: the line without its comment; '' on a docstring's lines (a string
    alone as a statement), on comment-only lines, and on the `def`/`class` headers and their decorators
    (they name a computation, they do not compute it)."""
    lines = text.splitlines()
    code = dict(enumerate(lines, 1))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            code[tok.start[0]] = lines[tok.start[0] - 1][:tok.start[1]]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for n in range(node.lineno, node.end_lineno + 1):
                code[n] = ""
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):  # a header and its decorators compute nothing
            for n in range(min([node.lineno] + [d.lineno for d in node.decorator_list]), node.body[0].lineno):
                code[n] = ""
    return code


MAX_COMPUTING_LINES = 16  # a function's worth: an equation that links more lines links call sites or plumbing


def _implementing(state, key, where=""):
    """(computing, citing): the line numbers of the annotated file that compute the equation tagged `key`
    (the code, without comments and docstrings, of the lines containing a text of its `implements`
    marker), and those that only cite it (`Eq. N` in a comment or docstring)."""
    text = _source(state["file"])
    lines, code = text.splitlines(), _code_lines(text)
    computing = set()
    for needle in state["implements"].get(key, []):
        hits = [n for n, line in enumerate(lines, 1) if needle in line]
        in_code = [n for n in hits if needle in code[n]]
        if not hits:
            log.warning(f"{where}: <!-- implements {key} \"{needle}\" -->: no line of {state['file']} contains the text")
        elif not in_code:
            log.warning(f"{where}: <!-- implements {key} \"{needle}\" -->: the text is only in comments, docstrings "
                        f"or def/class headers of {state['file']} (lines {hits}), not in code that computes")
        computing.update(in_code)
    if len(computing) > MAX_COMPUTING_LINES:
        log.warning(f"{where}: Eq. {key} links {len(computing)} lines of {state['file']}, more than a function's worth "
                    f"({MAX_COMPUTING_LINES}): name the lines that compute it, not those that call it")
    citing = {n for n, line in enumerate(lines, 1) for _, _, _, numbers in _refs(line) if key in numbers}
    return sorted(computing), sorted(citing - computing)


def _line_links(numbers, cls):
    """"lines 131–134, 140": runs of consecutive lines as ranges, each end a link to its line."""
    runs = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    link = lambda n: f'<a class="{cls}" href="#L{n}">{n}</a>'
    text = ", ".join(link(a) if a == b else f"{link(a)}–{link(b)}" for a, b in runs)
    return f'line{"s" if len(numbers) > 1 else ""} {text}'


def _link(match, equations, cited, where):
    """The HTML of one reference in the code: a link to its equation or to its item of the cited list."""
    m, paper, ref, numbers = match
    label = html.escape(m[0])
    if numbers:
        missing = [n for n in numbers if n not in equations]
        if missing:
            log.warning(f"{where}: the code cites Eq. {', '.join(missing)}, which no display on the page carries")
            return label
        parts = re.split(r"(\d+)", m[0])  # each number its own link: "Eq. 3 and 4"
        return "".join(f'<a class="ann-ref" href="#{equations[p]}">{html.escape(p)}</a>' if p in numbers
                       else html.escape(p) for p in parts)
    key = f"{paper} {ref}" if paper else ref
    target = _slug("ref", key)
    if target not in cited:
        log.warning(f"{where}: the code cites '{key}', which has no item in the list under <!-- cited -->")
        return label
    return f'<a class="ann-ref" href="#{target}" title="{html.escape(cited[target])}">{label}</a>'


def _highlight(text, link):
    """The file as a list of lines of highlighted HTML (pygments' token classes, the theme's colours),
    references to the paper inside comments and strings turned into links by `link`."""
    lines, current = [], []
    for ttype, value in PythonLexer(stripnl=False, ensurenl=False).get_tokens(text):
        css = STANDARD_TYPES.get(ttype)
        t = ttype
        while css is None and t.parent is not None:
            t = t.parent
            css = STANDARD_TYPES.get(t)
        for i, part in enumerate(value.split("\n")):
            if i:
                lines.append("".join(current))
                current = []
            if not part:
                continue
            if ttype in Comment or ttype in String:
                pieces, last = [], 0
                for r in _refs(part):
                    pieces += [html.escape(part[last:r[0].start()]), link(r)]
                    last = r[0].end()
                escaped = "".join(pieces) + html.escape(part[last:])
            else:
                escaped = html.escape(part)
            current.append(f'<span class="{css}">{escaped}</span>' if css else escaped)
            if (ttype in Punctuation or ttype in Operator) and part.strip():
                current.append("<wbr>")  # a long line wraps between tokens, never inside a name
    if current:
        lines.append("".join(current))
    return lines


def _changed_lines(text, other):
    """Line numbers of `text` that are not in `other` (replaced or inserted)."""
    a, b = other.splitlines(), text.splitlines()
    out = set()
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            out.update(range(j1 + 1, j2 + 1))
    return out


def _listing(name, lines, start, end, changed, file_url, repo):
    """Lines start..end (1-based, inclusive) of a file: one block of the annotated walk-through. The blank
    lines at either end of a block (the blank lines between two blocks) are kept, hidden (`ann-pad`), so
    that the page holds every line of the file once, in order, and shows none that pads a block."""
    raw = _source(name).splitlines()
    shown = [n for n in range(start, end + 1) if raw[n - 1].strip()] or [start]
    first, last = shown[0], shown[-1]
    rows = []
    for n in range(start, end + 1):
        indent = len(raw[n - 1]) - len(raw[n - 1].lstrip(" "))
        cls = "ann-line ann-changed" if n in changed else "ann-line"
        if n < first or n > last:
            cls += " ann-pad"
        rows.append(f'<span class="{cls}" id="L{n}" style="--i:{indent}"><a class="ann-ln" href="#L{n}" '
                    f'data-ln="{n}" aria-hidden="true" tabindex="-1"></a>{lines[n - 1]}\n</span>')
    source = f'<a href="{file_url}">{name}</a>'
    if repo:
        source += f' · <a href="{repo}/blob/HEAD/{name}#L{first}-L{last}">repository</a>'
    return (f'<div class="ann-code" data-file="{name}" data-start="{start}" data-end="{end}">'
            f'<div class="ann-file">{source} <span>lines {first}–{last}</span></div>'
            f'<div class="language-python highlight"><pre><code>{"".join(rows)}</code></pre></div></div>')


def _docstring_end(text):
    """The last line (1-based) of the module docstring, 0 when there is none."""
    tree = ast.parse(text)
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant) \
            and isinstance(tree.body[0].value.value, str):
        return tree.body[0].end_lineno
    return 0


def annotate(page, state, name, changed_from, body):
    """One walk-through: rows of (commentary, code block), the blocks tiling the file."""
    text = _source(name)
    lines = text.splitlines()
    state.update(file=name, changed_from=changed_from)
    if changed_from:
        _source(changed_from)  # a missing file fails here
    chunks = CODE.split(body)  # [commentary, start, commentary, start, ..., trailing]
    notes, starts, trailing = chunks[0:-1:2], chunks[1::2], chunks[-1]
    if trailing.strip():
        raise ValueError(f"text after the last <!-- code --> of {name}: {trailing.strip()[:60]!r}")
    first = _docstring_end(text) + 1
    if not starts or starts[0] is not None:
        raise ValueError(f"the first block of {name} must be <!-- code --> (from line {first})")
    begin = []
    for s in starts:
        if s is None:
            if begin:
                raise ValueError(f'only the first block of {name} may be <!-- code --> without a text')
            begin.append(first)
            continue
        hit = next((n for n in range(begin[-1] + 1, len(lines) + 1) if s in lines[n - 1]), None)
        if hit is None:
            raise ValueError(f'no line of {name} after line {begin[-1]} contains "{s}"')
        while hit - 1 > begin[-1] and lines[hit - 2].lstrip().startswith("@"):
            hit -= 1  # a function's decorators start its block
        begin.append(hit)
    ends = [b - 1 for b in begin[1:]] + [len(lines)]
    out = []
    for note, a, b in zip(notes, begin, ends):
        i = len(state["blocks"])
        state["blocks"].append((a, b))
        head = re.match(r"\s*((?:^#{1,6} .*\n\s*)*)", note, re.MULTILINE)
        heading, note = head[1].strip(), note[head.end():]
        out.append(f"{heading}\n\n" if heading else "")
        out.append(f'<div class="ann-row" markdown>\n<div class="ann-note" markdown>\n\n{note.strip()}\n\n</div>\n'
                   f'<div class="ann-code" data-block="{i}"></div>\n</div>\n\n')
    return "".join(out)


def _source(name):
    path = ROOT / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} does not exist at the repository root")
    return path.read_text(encoding="utf-8")


# --- <!-- diff a.py b.py --> ---------------------------------------------------------------------

def diff(a, b):
    lines = difflib.unified_diff(_source(a).splitlines(), _source(b).splitlines(), a, b, n=3, lineterm="")
    return "````diff\n" + "\n".join(lines) + "\n````\n"


# --- <!-- args method.py --> ---------------------------------------------------------------------

def _comments(text):
    """Trailing comment of each line: {line number: comment text}."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _fields(text, class_name):
    """[(name, default source, comment)] of the annotated fields of a dataclass, in order."""
    tree, comments = ast.parse(text), _comments(text)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [(f.target.id, ast.get_source_segment(text, f.value), comments.get(f.end_lineno, ""))
                    for f in node.body if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)]
    raise LookupError(f"no class {class_name}")


def _dict_of_dicts(text, name):
    """{key: {field: value source}} of a module-level `NAME = {"key": dict(a=1, ...)}` or `{"key": {...}}`."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            out = {}
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(value, ast.Call):  # dict(a=1, b=2)
                    out[key.value] = {kw.arg: ast.get_source_segment(text, kw.value) for kw in value.keywords}
                else:  # {"a": 1, "b": 2}
                    out[key.value] = {k.value: ast.get_source_segment(text, v)
                                      for k, v in zip(value.keys, value.values)}
            return out
    return {}


def args_table(method):
    """Each hyper-parameter: the CIFAR-10 default, the `--dataset imagenet` value, and the source comment.
    Values follow common/cli.py's precedence: Args defaults < DATASET_DEFAULTS[dataset] < PRESETS[dataset]."""
    text, cli = _source(method), _source("common/cli.py")
    own = _fields(text, "Args")
    system = _fields(cli, "System")
    presets, dataset_defaults = _dict_of_dicts(text, "PRESETS"), _dict_of_dicts(cli, "DATASET_DEFAULTS")

    def value(name, default, dataset):
        return presets.get(dataset, {}).get(name, dataset_defaults.get(dataset, {}).get(name, default))

    rows = ["| flag | CIFAR-10 default | `--dataset imagenet` | symbol and source |", "|---|---|---|---|"]
    names = {name for name, _, _ in own}
    differs = [f for f in system if value(f[0], f[1], "cifar10") != value(f[0], f[1], "imagenet")]
    shown = own + [f for f in differs if f[0] not in names]  # arch, image_size: set by the dataset
    for name, default, comment in shown:
        cifar, imagenet = value(name, default, "cifar10"), value(name, default, "imagenet")
        imagenet_cell = f"**`{imagenet}`**" if imagenet != cifar else f"`{imagenet}`"
        rows.append(f"| `--{name.replace('_', '-')}` | `{cifar}` | {imagenet_cell} | {comment.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


# --- <!-- api common --> -------------------------------------------------------------------------

def _def(node):
    """The `def` line of a function, with its decorators (as in the source, without the body)."""
    decorators = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{decorators}def {node.name}({ast.unparse(node.args)}){returns}"


def _doc(node):
    """A docstring as markdown: a list that starts right under a line of text gets the blank line
    markdown needs (otherwise it renders as one paragraph with literal dashes)."""
    doc = ast.get_docstring(node)
    if not doc:
        return ""
    doc = re.sub(r"^([^\s-][^\n]*)\n(- )", r"\1\n\n\2", doc, flags=re.MULTILINE)
    return doc + "\n\n"


def _module(path):
    text = path.read_text(encoding="utf-8")
    tree, lines = ast.parse(text), text.splitlines()
    mod = f"common.{path.stem}"
    out = [f"## `{mod}` {{#{mod}}}\n", _doc(tree)]
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.FunctionDef):
            out += [f"### {node.name} {{#{mod}.{node.name}}}\n", f"```python\n{_def(node)}\n```\n", _doc(node)]
            continue
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        code = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list) + f"class {node.name}"
        code += f"({bases}):" if bases else ":"
        fields = ["\n    ".join(s.strip() for s in lines[f.lineno - 1:f.end_lineno])  # with its trailing comment
                  for f in node.body if isinstance(f, ast.AnnAssign)]
        init = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
        code += "".join(f"\n    {f}" for f in fields) + "".join(f"\n    {_def(n)}" for n in init)
        out += [f"### {node.name} {{#{mod}.{node.name}}}\n", f"```python\n{code}\n```\n", _doc(node)]
        for m in node.body:
            if isinstance(m, ast.FunctionDef) and not m.name.startswith("_"):
                out += [f"#### {node.name}.{m.name} {{#{mod}.{node.name}.{m.name}}}\n",
                        f"```python\n{_def(m)}\n```\n", _doc(m)]
    return "\n".join(out)


def api(package):
    folder = ROOT / package
    if not folder.is_dir():
        raise FileNotFoundError(f"{package}/ does not exist at the repository root")
    files = [p for p in folder.glob("*.py") if p.stem != "__init__"]
    files.sort(key=lambda p: (API_ORDER.index(p.stem) if p.stem in API_ORDER else len(API_ORDER), p.stem))
    return "\n".join(_module(p) for p in files)


# --- <!-- measured [method] --> ------------------------------------------------------------------

def measured(method=None):
    """README.md's "Measured" table, or its rows whose first cell names `method` ("SimSiam, ..." for
    simsiam, "MoCo v2 ..." for mocov2); "Not yet measured." when there are none."""
    m = re.search(r"^## Measured\n(.*?)(?=^## |\Z)", _source("README.md"), re.MULTILINE | re.DOTALL)
    if not m:
        raise LookupError("README.md has no '## Measured' section")
    table = [line for line in m[1].splitlines() if line.startswith("|")]
    if len(table) < 2:
        raise LookupError("README.md's '## Measured' section has no table")
    header, rows = table[:2], table[2:]
    if method:
        rows = [r for r in rows if re.sub(r"\W", "", r.split("|")[1]).lower().startswith(method.lower())]
    return "\n".join(header + rows) + "\n" if rows else "Not yet measured.\n"


# --- <!-- clone --> -----------------------------------------------------------------------------

def clone(repo_url):
    """The clone step, from mkdocs.yml's `repo_url` (the project's repository)."""
    if repo_url:
        name = repo_url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        return f"```bash\ngit clone {repo_url}\ncd {name}\n```\n"
    return ("```bash\ngit clone REPOSITORY ssl-reference   # REPOSITORY: the address you have the project from\n"
            "cd ssl-reference\n```\n")


# --- <!-- readme TITLE --> -----------------------------------------------------------------------

def readme(*title):
    """The text of README.md's section `## TITLE` (up to the next `## ` heading)."""
    title = " ".join(title)
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", _source("README.md"), re.MULTILINE | re.DOTALL)
    if not m:
        raise LookupError(f"README.md has no '## {title}' section")
    return m[1].strip() + "\n"
