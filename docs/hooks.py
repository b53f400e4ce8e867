"""mkdocs hooks: page content generated at build time from the real files at the repository root.

A page asks for generated content with an HTML comment alone on a line:

    <!-- diff mocov1.py mocov2.py -->    unified diff of two files (difflib), as a ```diff block
    <!-- args simsiam.py -->             hyper-parameter table from the file's `Args` and `PRESETS`
    <!-- api common -->                  signatures and docstrings of every module in common/
    <!-- measured simsiam -->            the rows of README.md's "Measured" table for one method
    <!-- measured -->                    (or all of them)
    <!-- readme TITLE -->                the text of README.md's section "## TITLE"

Everything is read with `ast`, never imported, so the build needs neither torch nor a GPU. A marker
that names a missing file or cannot be generated logs a warning, which fails `mkdocs build --strict`.
"""
import ast
import difflib
import io
import re
import tokenize
from pathlib import Path

from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("docs-hooks")
ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^([ \t]*)<!--\s*(diff|args|api|measured|readme)\b\s*([^>]*?)\s*-->[ \t]*$", re.MULTILINE)
API_ORDER = ["cli", "dist", "data", "resnet", "train", "optim", "evaluate", "linear", "knn", "report", "bench"]


def on_page_markdown(markdown, page, **kwargs):
    def replace(m):
        indent, kind, operands = m[1], m[2], m[3]
        try:
            text = {"diff": diff, "args": args_table, "api": api, "measured": measured,
                    "readme": readme}[kind](*operands.split())
        except Exception as e:  # a warning: `mkdocs build --strict` fails, `mkdocs serve` keeps going
            log.warning(f"{page.file.src_uri}: cannot expand <!-- {kind} {operands} -->: {type(e).__name__}: {e}")
            text = f"!!! failure \"{kind} {operands}: {type(e).__name__}\"\n    {e}\n"
        return "".join(indent + line if line.strip("\r\n") else line for line in text.splitlines(keepends=True))
    return MARKER.sub(replace, markdown)


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
    doc = ast.get_docstring(node)
    return doc + "\n\n" if doc else ""


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


# --- <!-- readme TITLE --> -----------------------------------------------------------------------

def readme(*title):
    """The text of README.md's section `## TITLE` (up to the next `## ` heading)."""
    title = " ".join(title)
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", _source("README.md"), re.MULTILINE | re.DOTALL)
    if not m:
        raise LookupError(f"README.md has no '## {title}' section")
    return m[1].strip() + "\n"
