"""The method diagrams, docs/assets/diagrams/<method>.svg: exactly what docs/diagrams.py draws, well-formed SVG
with a title and a description, nothing loaded from outside, no text below 16 units in the 900-unit width (12 px
at a 700 px display), and the ingredients each one draws present in the method file it stands for."""
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
METHODS = ["mocov1", "mocov2", "simclr", "byol", "simsiam", "barlow", "vicreg", "unigrad"]


def generator():
    spec = importlib.util.spec_from_file_location("diagrams", ROOT / "docs" / "diagrams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_diagrams_are_the_generators_output():
    diagrams = generator()
    assert list(diagrams.DIAGRAMS) == METHODS
    assert sorted(p.name for p in diagrams.OUT.glob("*.svg")) == sorted(f"{m}.svg" for m in METHODS)
    for method, draw in diagrams.DIAGRAMS.items():
        committed = (diagrams.OUT / f"{method}.svg").read_text(encoding="utf-8")
        assert committed == draw().svg(), f"{method}.svg is stale: `uv run python docs/diagrams.py` rewrites it"


def parse(method):
    return ET.parse(ROOT / "docs" / "assets" / "diagrams" / f"{method}.svg").getroot()


def shown_text(root):
    """The words a reader sees: every <text>, tspans included, without the title and description."""
    return " ".join("".join(t.itertext()) for t in root.iter(f"{SVG}text"))


@pytest.mark.parametrize("method", METHODS)
def test_a_diagram_is_accessible_offline_and_legible(method):
    root = parse(method)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    title, desc = root.find(f"{SVG}title"), root.find(f"{SVG}desc")
    assert title is not None and f"{method}.py" in title.text
    assert desc is not None and len(desc.text) > 200, "the description says what the diagram shows, in words"
    assert root.get("aria-labelledby").split() == [title.get("id"), desc.get("id")]
    width = float(root.get("viewBox").split()[2])
    assert width == 900
    for element in root.iter():
        assert element.tag.removeprefix(SVG) not in {"image", "script", "style", "foreignObject", "a"}, element.tag
        for name, value in element.attrib.items():
            assert not re.search(r"(https?:)?//|@import", value) or name == "xmlns", f"{method}: {name}={value}"
            if name == "href" or name.endswith("}href"):
                assert value.startswith("#"), value
        if element.tag == f"{SVG}text":
            assert float(element.get("font-size")) >= 16, f"{method}: {''.join(element.itertext())!r} is too small"


@pytest.mark.parametrize("method", METHODS)
def test_a_diagram_draws_what_the_method_file_has(method):
    """Each ingredient is drawn exactly when the file has it: a momentum copy of the weights (a dotted
    EMA arrow), a predictor, MoCo's queue, embeddings gathered with gradient across ranks."""
    source = (ROOT / f"{method}.py").read_text(encoding="utf-8")
    svg = (ROOT / "docs" / "assets" / "diagrams" / f"{method}.svg").read_text(encoding="utf-8")
    words = shown_text(parse(method))
    ema = len(re.findall(r'marker-end="url\(#head-ema\)"', svg)) > 1  # more than the legend's own sample
    assert ema == ("copy.deepcopy" in source), f"{method}: momentum copy drawn {ema}"
    assert ("predictor" in words) == ("self.predictor" in source), f"{method}: predictor"
    assert ("queue" in words) == ("self.queue" in source), f"{method}: queue"
    assert ("with gradient" in words) == ("gather_with_grad(" in source), f"{method}: gathered with gradient"
