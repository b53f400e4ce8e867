"""One diagram per method, drawn as plain SVG text: `uv run python docs/diagrams.py` writes
docs/assets/diagrams/<method>.svg (tests/test_diagrams.py checks the committed files equal its output).

One visual grammar for all eight. A box is one set of weights or one operation; a tall box that both
views pass through is one set of weights applied to both (shared weights). Line styles (the legend
at the foot of each diagram): solid, the forward pass through which the gradient flows back; dashed
grey, computed without gradient (stop-gradient, torch.no_grad); dotted orange, a momentum (EMA) copy
of the weights; thick violet, a tensor gathered across torchrun ranks. Maths is Unicode text in the
papers' symbols, x_q / x^{k} marking sub- and superscripts; nothing is fetched, no font is embedded.
"""
import re
from pathlib import Path
from xml.sax.saxutils import escape

OUT = Path(__file__).parent / "assets" / "diagrams"
W = 900  # the viewBox width; every font is at least 16 units, 12 px at a 700 px display width
FONT = "DejaVu Sans, Verdana, Arial, Helvetica, sans-serif"
MATH = "DejaVu Math TeX Gyre, Cambria Math, STIX Two Math, DejaVu Sans, serif"  # 𝒯, where sans fonts lack it
INK, GREY, ORANGE, VIOLET = "#1f2937", "#6b7280", "#c2410c", "#6d28d9"
LINES = {  # style: (colour, width, dash pattern, legend)
    "grad": (INK, 2, None, "forward; the gradient flows back"),
    "sg": (GREY, 2, "7 5", "no gradient (stop-gradient)"),
    "ema": (ORANGE, 2.5, "2 5", "momentum (EMA) copy of weights"),
    "gather": (VIOLET, 4, None, "gathered across torchrun ranks"),
}
FILLS = {  # kind: (fill, stroke)
    "online": ("#dbeafe", "#1d4ed8"),  # trained weights
    "target": ("#ffedd5", "#c2410c"),  # momentum / target weights, never given a gradient
    "op": ("#f3f4f6", "#4b5563"),  # an operation without weights
    "data": ("#ffffff", INK),
    "loss": ("#fee2e2", "#b91c1c"),
    "gather": ("#ede9fe", VIOLET),
}


def markup(s):
    """Escape s and turn _x, _{xy}, ^x, ^{xy} into sub- and superscript tspans; 𝒯 gets a maths font."""
    s = escape(s)
    s = re.sub(r"([_^])(\{[^}]*\}|[^\s{])", lambda m: '<tspan baseline-shift="{}" font-size="85%">{}</tspan>'.format(
        "sub" if m[1] == "_" else "super", m[2].strip("{}")), s)
    return s.replace("𝒯", f'<tspan font-family="{MATH}">𝒯</tspan>')


class Diagram:
    def __init__(self, name, height, title, desc):
        self.name, self.h, self.parts = name, height, []
        self.title, self.desc = title, desc

    def text(self, x, y, s, size=16, anchor="middle", colour=INK, weight="normal", halo=False):
        extra = ' stroke="#ffffff" stroke-width="5" paint-order="stroke"' if halo else ""
        self.parts.append(f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" fill="{colour}" '
                          f'font-weight="{weight}"{extra}>{markup(s)}</text>')

    def box(self, x, y, w, h, lines, kind="online", size=17, gap=8):
        """A rounded box with its lines centred; the first line bold when there are several."""
        fill, stroke = FILLS[kind]
        dash = ' stroke-dasharray="7 5"' if kind == "target" else ""
        self.parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" stroke="{stroke}" '
                          f'stroke-width="2"{dash}/>')
        top = y + h / 2 - (len(lines) - 1) * (size + gap) / 2 + size * 0.35
        for i, line in enumerate(lines):
            self.text(x + w / 2, top + i * (size + gap), line, size if i == 0 else 16,
                      weight="bold" if i == 0 and len(lines) > 1 else "normal")

    def line(self, points, style="grad", label=None, at=None, arrow=True, anchor="middle"):
        """A polyline through points, an arrowhead at its end; label at `at` (default: above the first leg)."""
        colour, width, dash, _ = LINES[style]
        d = " ".join(f"{x},{y}" for x, y in points)
        extra = (f' stroke-dasharray="{dash}"' if dash else "") + (f' marker-end="url(#head-{style})"' if arrow else "")
        self.parts.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="{width}" '
                          f'stroke-linecap="round" stroke-linejoin="round"{extra}/>')
        if label:
            (x0, y0), (x1, y1) = points[:2]
            x, y = at or ((x0 + x1) / 2, min(y0, y1) - 8)
            self.text(x, y, label, 16, anchor, colour if style != "grad" else INK, halo=True)

    def fraction(self, cx, y, num, den, size=17):
        """num over den, centred at cx; y is the baseline of the numerator."""
        width = max(len(re.sub(r"[_^{}]", "", s)) for s in (num, den)) * size * 0.56
        self.text(cx, y, num, size)
        self.parts.append(f'<line x1="{cx - width / 2}" y1="{y + 7}" x2="{cx + width / 2}" y2="{y + 7}" '
                          f'stroke="{INK}" stroke-width="1.5"/>')
        self.text(cx, y + 7 + size + 3, den, size)

    def ranks(self, y, lines):
        """The footer: what torchrun ranks gather, in a violet panel."""
        h = 16 + 22 * len(lines)
        self.parts.append(f'<rect x="15" y="{y}" width="{W - 30}" height="{h}" rx="8" fill="#f5f3ff" '
                          f'stroke="{VIOLET}" stroke-width="1.5"/>')
        for i, s in enumerate(lines):
            self.text(30, y + 26 + 22 * i, s, 16, "start", weight="bold" if i == 0 else "normal")
        return y + h

    def legend(self, y):
        """Line styles in two rows, then the kinds of boxes in one."""
        for i, (style, (_, _, _, label)) in enumerate(LINES.items()):
            x, row = 30 + 430 * (i % 2), y + 24 * (i // 2)
            self.line([(x, row), (x + 50, row)], style)
            self.text(x + 62, row + 5, label, 16, "start")
        for x, kind, label in ((30, "online", "trained weights"), (235, "target", "momentum weights"),
                               (460, "gather", "across ranks"), (640, "op", "no weights")):
            self.box(x, y + 46, 36, 20, [], kind)
            self.text(x + 46, y + 62, label, 16, "start")
        self.text(30, y + 90, "A box that both views pass through: the same weights for both (shared).", 16, "start")
        return y + 96

    def svg(self):
        defs = "".join(f'<marker id="head-{s}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="{12 / w:.2f}" '
                       f'markerHeight="{12 / w:.2f}" markerUnits="strokeWidth" orient="auto">'
                       f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>' for s, (c, w, _, _) in LINES.items())
        body = "\n".join(self.parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {self.h}" width="{W}" '
                f'height="{self.h}" role="img" aria-labelledby="{self.name}-title {self.name}-desc" '
                f'font-family="{FONT}">\n<title id="{self.name}-title">{escape(self.title)}</title>\n'
                f'<desc id="{self.name}-desc">{escape(self.desc)}</desc>\n<defs>{defs}</defs>\n'
                f'<rect x="1" y="1" width="{W - 2}" height="{self.h - 2}" rx="14" fill="#ffffff" stroke="#d1d5db"/>\n'
                f"{body}\n</svg>\n")


# --- the methods ---------------------------------------------------------------------------------------------

def moco(version):
    head = "fc → 128" if version == 1 else "fc, ReLU, fc → 128"
    name = f"mocov{version}"
    d = Diagram(name, 664, f"MoCo v{version}: one training step of {name}.py",
                f"The image x gives two views, x^q and x^k, by the same augmentation. The query encoder f_q "
                f"(a ResNet and {head}, weights θ_q) and an L2 normalisation give q; the gradient flows into θ_q only. Before "
                f"the keys are computed, the key encoder's weights are updated as a momentum copy, θ_k ← m θ_k + "
                f"(1 − m) θ_q. The keys are computed without gradient: x^k is gathered from all ranks and shuffled "
                f"(ShuffleBN; on one process, BN over 8 sub-batches), encoded by f_k, L2-normalised, gathered and "
                f"unshuffled back into query order, giving k. InfoNCE takes q, its positive key k₊ = k and the K "
                f"negative keys of the queue. Afterwards the keys of all ranks are enqueued and the oldest dequeued.")
    q, k = 100, 250
    two_views(d, q, k, ("x^q", "x^k"), second="sg")
    d.line([(160, q), (295, q)])
    d.line([(160, k), (175, k)], "sg")
    d.box(175, k - 32, 100, 64, ["shuffle", "(ShuffleBN)"], "gather", 16)
    d.line([(275, k), (295, k)], "sg")
    d.box(295, q - 42, 175, 84, ["f_q (θ_q)", "ResNet +", head], "online")
    d.box(295, k - 42, 175, 84, ["f_k (θ_k)", "ResNet +", head], "target")
    d.line([(375, q + 42), (375, k - 42)], "ema")
    d.text(388, 165, "① each step, before the keys:", 16, "start", ORANGE)
    d.text(388, 188, "θ_k ← m θ_k + (1 − m) θ_q", 17, "start", ORANGE)
    for y, style in ((q, "grad"), (k, "sg")):
        d.line([(470, y), (485, y)], style)
        d.box(485, y - 22, 50, 44, ["‖·‖"], "op")
    d.line([(535, q), (690, q)], label="q", at=(610, q - 10))
    d.line([(535, k), (550, k)], "sg")
    d.box(550, k - 32, 102, 64, ["unshuffle", "(gather k)"], "gather", 16)
    d.line([(650, k), (690, k)], "sg", label="k", at=(668, k - 10))
    d.box(690, 55, 195, 245, [], "loss")
    d.text(787, 82, "InfoNCE", 17, weight="bold")
    d.text(705, 112, "L_q = −log", 17, "start")
    d.fraction(787, 140, "exp(q·k_+/τ)", "Σ_{i=0…K} exp(q·k_i/τ)", 16)
    d.text(787, 212, "k_0 = k_+ = k: positive", 16)
    d.text(787, 235, "k_1 … k_K: the queue", 16)
    d.text(787, 275, "SGD on θ_q only", 16, weight="bold")
    d.box(690, 340, 195, 56, ["queue", "K keys, (dim, K)"], "op", 16)
    d.line([(787, 340), (787, 300)], "sg", label="k_1 … k_K", at=(838, 326))
    d.line([(670, k), (670, 368), (690, 368)], "gather", )
    d.text(656, 350, "② enqueue all ranks' k,", 16, "end", VIOLET)
    d.text(656, 372, "dequeue the oldest", 16, "end", VIOLET)
    y = d.ranks(420, ["torchrun ranks", "x^k of all ranks gathered without gradient, shuffled by rank 0's permutation, each rank's",
                      "slice encoded with its own BN; the keys gathered and unshuffled. Queue: the same on every rank.",
                      "One process: BN over 8 interleaved sub-batches (SplitBN), the shuffle within the batch."])
    d.legend(y + 22)
    return d


def simclr():
    d = Diagram("simclr", 664, "SimCLR: one training step of simclr.py",
                "The image x gives two views, x̃_i and x̃_j, by two augmentations drawn from the same family. "
                "The two views of the batch are concatenated into one batch of 2n, so that every BatchNorm "
                "normalises over all 2N views, and pass through one encoder f (a ResNet) and one projection head "
                "g (Linear, BN, ReLU, Linear, BN without β), giving z. Each rank's 2n embeddings are the anchors; "
                "the embeddings of all ranks are gathered with gradient as the 2N candidates. NT-Xent compares, "
                "by cosine similarity over τ, each anchor with its partner view against the other 2N − 1 views "
                "(2N − 2 negatives); the code trains on twice the paper's L, the official scale. The gradient flows "
                "through both views and through the gathered candidates.")
    i, j, mid = 100, 250, 175
    d.box(15, mid - 30, 60, 60, ["x"], "data", 20)
    d.line([(45, mid - 30), (45, i), (105, i)], label="t ∼ 𝒯", at=(75, i - 10))
    d.line([(45, mid + 30), (45, j), (105, j)], label="t′ ∼ 𝒯", at=(75, j - 10))
    d.box(105, i - 25, 55, 50, ["x̃_i"], "data")
    d.box(105, j - 25, 55, 50, ["x̃_j"], "data")
    d.line([(160, i), (180, i)])
    d.line([(160, j), (180, j)])
    d.box(180, i - 30, 95, j - i + 60, ["concat", "one batch", "of 2n views"], "op", 16)
    d.line([(275, mid), (295, mid)])
    d.box(295, mid - 40, 95, 80, ["f(·)", "ResNet"], "online")
    d.line([(390, mid), (420, mid)], label="h", at=(405, mid - 10))
    d.box(420, mid - 55, 165, 110, ["g(·)", "Linear, BN, ReLU,", "Linear, BN (no β)"], "online")
    d.line([(585, mid), (635, mid)], label="z", at=(600, mid - 10))
    d.line([(610, mid), (610, 372), (635, 372)], "gather")
    d.box(635, 342, 250, 60, ["gathered with gradient", "z of all ranks: 2N candidates"], "gather", 16)
    d.line([(760, 342), (760, 312)], "gather")
    d.box(635, 45, 250, 267, [], "loss")
    d.text(760, 72, "NT-Xent", 17, weight="bold")
    d.text(650, 102, "ℓ(i, j) = −log", 17, "start")
    d.fraction(760, 130, "exp(sim(z_i, z_j)/τ)", "Σ_{k≠i} exp(sim(z_i, z_k)/τ)", 16)
    d.text(760, 190, "sim(u, v) = uᵀv / (‖u‖ ‖v‖)", 16)
    d.text(760, 213, "i: this rank's 2n anchors", 16)
    d.text(760, 240, "L = (1/2N) Σ_k [ℓ(2k−1, 2k)", 16)
    d.text(760, 262, "+ ℓ(2k, 2k−1)]", 16)
    d.text(760, 294, "trained on 2L (official)", 16, weight="bold")
    y = d.ranks(430, ["torchrun ranks", "z of all ranks gathered with gradient: each rank's 2n anchors against all 2N candidates,",
                      "the backward summing every rank's part (1 GPU ≡ W GPUs). Global BN (SyncBN) over the 2N views."])
    d.legend(y + 22)
    return d


def two_views(d, top, bottom, names=("x_1", "x_2"), aug=("t ∼ 𝒯", "t′ ∼ 𝒯"), second="grad"):
    """The image x and its two views, ending at x = 160 on the lanes top and bottom."""
    mid = (top + bottom) / 2
    d.box(15, mid - 30, 55, 60, ["x"], "data", 20)
    d.line([(42, mid - 30), (42, top), (105, top)], label=aug[0], at=(76, top - 10))
    d.line([(42, mid + 30), (42, bottom), (105, bottom)], second, label=aug[1], at=(76, bottom - 10))
    d.box(105, top - 25, 55, 50, [names[0]], "data")
    d.box(105, bottom - 25, 55, 50, [names[1]], "data")


def four_lanes(d, lanes, names, aug):
    """The image x and its two views, each sent to two lanes: view 1 to lanes 0 and 2, view 2 to lanes 1 and 3
    (the upper pair trained, the lower pair without gradient), ending at x = 195."""
    on1, on2, ta1, ta2 = lanes
    mid = (on2 + ta1) / 2
    d.box(15, mid - 30, 55, 60, ["x"], "data", 20)
    d.line([(42, mid - 30), (42, on1), (105, on1)], label=aug[0], at=(75, on1 - 10))
    d.line([(42, mid + 30), (42, ta2), (105, ta2)], label=aug[1], at=(75, ta2 - 10))
    d.box(105, on1 - 22, 45, 44, [names[0]], "data")
    d.box(105, ta2 - 22, 45, 44, [names[1]], "data")
    d.line([(150, on1), (195, on1)])
    d.line([(127, on1 + 22), (127, ta1), (195, ta1)], "sg")
    d.line([(150, ta2), (195, ta2)], "sg")
    d.line([(150, ta2), (165, ta2), (165, on2), (195, on2)])


def simsiam():
    d = Diagram("simsiam", 624, "SimSiam: one training step of simsiam.py",
                "The image x gives two views, x_1 and x_2, by the same augmentation. Both pass through the one "
                "encoder f (a ResNet and the projection MLP, whose last BN has no affine), each view its own BN "
                "batch, giving z_1 and z_2, and through the one predictor h (a bottleneck MLP), giving p_1 and "
                "p_2. The loss is L = ½ D(p_1, stopgrad(z_2)) + ½ D(p_2, stopgrad(z_1)), with D the negative "
                "cosine similarity: each prediction is compared with the other view's z, whose gradient is "
                "stopped (the dashed arrows that cross). No negatives, no momentum encoder.")
    a, b = 110, 260
    two_views(d, a, b)
    for y in (a, b):
        d.line([(160, y), (200, y)])
    d.box(200, a - 35, 170, b - a + 70, ["encoder f", "ResNet +", "projection MLP", "(last BN: no affine)"], "online")
    d.line([(370, a), (470, a)], label="z_1", at=(395, a - 10))
    d.line([(370, b), (470, b)], label="z_2", at=(395, b - 10))
    d.box(470, a - 35, 130, b - a + 70, ["predictor h", "bottleneck", "MLP"], "online")
    d.line([(600, a), (665, a)], label="p_1", at=(614, a - 10))
    d.line([(600, b), (665, b)], label="p_2", at=(614, b - 10))
    d.line([(415, a), (415, 45), (632, 45), (632, b - 30), (665, b - 30)], "sg", label="sg(z_1)", at=(520, 37))
    d.line([(435, b), (435, 330), (650, 330), (650, a + 30), (665, a + 30)], "sg", label="sg(z_2)", at=(540, 322))
    d.box(665, a - 40, 220, b - a + 80, [], "loss")
    d.text(775, a + 6, "½ D(p_1, sg(z_2))", 17)
    d.text(775, (a + b) / 2 - 10, "+", 17, weight="bold")
    d.text(775, (a + b) / 2 + 18, "D(p, z) = −p̄ · z̄", 16)
    d.text(775, (a + b) / 2 + 40, "p̄ = p / ‖p‖_2", 16)
    d.text(775, b + 6, "½ D(p_2, sg(z_1))", 17)
    y = d.ranks(372, ["torchrun ranks", "Nothing gathered but BN statistics: SyncBN over all ranks in f and h; DDP averages the",
                      "gradients. Each view is its own BN batch (the views go through f one after the other)."])
    d.legend(y + 22)
    return d


def byol():
    d = Diagram("byol", 704, "BYOL: one training step of byol.py",
                "The image x gives two views, v = t(x) and v′ = t′(x), by two different augmentations (t ∼ 𝒯, "
                "t′ ∼ 𝒯′). Each view goes through the online network θ (encoder f_θ, projector g_θ, predictor "
                "q_θ), giving the predictions p_1 from v and p_2 from v′, and, without gradient, through the "
                "target network ξ (f_ξ, g_ξ, no predictor), giving z′_1 from v and z′_2 from v′. The loss sums "
                "both directions: L = ‖p̄_1 − z̄′_2‖² and L̃ = ‖p̄_2 − z̄′_1‖², with the bar an L2 normalisation, "
                "each equal to 2 − 2 cos. Only θ takes the optimiser step; after it, the target becomes a moving "
                "average, ξ ← τξ + (1 − τ)θ, with τ rising from τ_base to 1 by a cosine over the steps.")
    lanes = on1, on2, ta1, ta2 = 85, 150, 290, 355
    four_lanes(d, lanes, ("v", "v′"), ("t ∼ 𝒯", "t′ ∼ 𝒯′"))
    d.text(195, 38, "online network θ", 17, "start", "#1d4ed8", "bold")
    d.text(195, 418, "target network ξ (no gradient)", 17, "start", ORANGE, "bold")
    for x, w, names in ((195, 85, ["f_θ", "ResNet"]), (305, 100, ["g_θ", "projector"]), (425, 100, ["q_θ", "predictor"])):
        d.box(x, on1 - 30, w, on2 - on1 + 60, names, "online")
    for x, w, names in ((195, 85, ["f_ξ", "ResNet"]), (305, 100, ["g_ξ", "projector"])):
        d.box(x, ta1 - 30, w, ta2 - ta1 + 60, names, "target")
    for y in (on1, on2):
        d.line([(280, y), (305, y)])
        d.line([(405, y), (425, y)])
    for y in (ta1, ta2):
        d.line([(280, y), (305, y)], "sg")
    d.line([(525, on1), (600, on1)], label="p_1", at=(560, on1 - 9))
    d.line([(525, on2), (600, on2)], label="p_2", at=(560, on2 - 9))
    d.line([(405, ta1), (600, ta1)], "sg", label="z′_1 (sg)", at=(545, ta1 - 9))
    d.line([(405, ta2), (600, ta2)], "sg", label="z′_2 (sg)", at=(545, ta2 - 9))
    for x in (237, 355):
        d.line([(x, on2 + 30), (x, ta1 - 30)], "ema")
    d.text(372, 205, "after each optimiser step:", 16, "start", ORANGE)
    d.text(372, 228, "ξ ← τξ + (1 − τ)θ", 17, "start", ORANGE)
    d.text(372, 251, "τ: τ_{base} → 1 (cosine)", 16, "start", ORANGE)
    d.box(600, 45, 285, 345, [], "loss")
    d.text(742, 72, "L^{BYOL} = L + L̃", 17, weight="bold")
    d.text(742, on1 + 26, "L = ‖p̄_1 − z̄′_2‖²", 17)
    d.text(742, on2 + 26, "L̃ = ‖p̄_2 − z̄′_1‖²", 17)
    d.text(742, 202, "p = q_θ(z_θ), z_θ = g_θ(f_θ(·))", 16)
    d.text(742, 228, "z′ = z′_ξ = g_ξ(f_ξ(·))", 16)
    d.text(742, 254, "p̄ = p / ‖p‖_2", 16)
    d.text(742, 280, "‖p̄ − z̄′‖² = 2 − 2 cos(p, z′)", 16)
    d.text(742, ta2 + 8, "step on θ only", 16, weight="bold")
    y = d.ranks(440, ["torchrun ranks", "Nothing gathered but BN statistics: SyncBN over all ranks in both networks (the target's",
                      "running statistics its own). DDP averages θ's gradients; ξ follows θ, the same on every rank."])
    d.legend(y + 22)
    return d


def barlow():
    d = Diagram("barlow", 584, "Barlow Twins: one training step of barlow.py",
                "The image x gives two views, Y^A and Y^B, by two augmentations (t_A, t_B ∼ 𝒯, BYOL's, which differ "
                "only in their blur and solarization probabilities). Both pass through "
                "the one network f_θ, a ResNet and a projector of three bias-free Linear layers (BN and ReLU on "
                "the first two), each view its own BN batch, giving the embeddings Z^A and Z^B. These are gathered "
                "from all ranks with gradient, each dimension is standardised over the global batch N (BN without "
                "affine, biased variance), and the cross-correlation matrix C_ij = Σ_b ẑ^A_bi ẑ^B_bj / N is pulled "
                "towards the identity: L_BT = Σ_i (1 − C_ii)² + λ Σ_i Σ_j≠i C_ij².")
    a, b = 100, 250
    two_views(d, a, b, ("Y^A", "Y^B"), ("t_A ∼ 𝒯", "t_B ∼ 𝒯"))
    for y in (a, b):
        d.line([(160, y), (190, y)])
    d.box(190, a - 35, 150, b - a + 70, ["f_θ", "ResNet +", "projector"], "online")
    d.line([(340, a), (375, a)], label="Z^A", at=(357, a - 10))
    d.line([(340, b), (375, b)], label="Z^B", at=(357, b - 10))
    d.box(375, a - 35, 110, b - a + 70, ["gather", "with", "gradient", "N × d each"], "gather", 16)
    for y in (a, b):
        d.line([(485, y), (510, y)])
        d.box(510, y - 32, 115, 64, ["ẑ", "standardise"], "op", 17)
        d.line([(625, y), (650, y)])
    d.box(650, a - 35, 235, b - a + 70, [], "loss")
    d.text(767, a - 6, "C = (ẑ^A)ᵀ ẑ^B / N", 17, weight="bold")
    d.text(767, a + 18, "(d × d) cross-correlation", 16)
    d.text(767, a + 52, "L_{BT} = Σ_i (1 − C_{ii})²", 17)
    d.text(767, a + 78, "+ λ Σ_i Σ_{j≠i} C_{ij}²", 17)
    d.text(767, a + 110, "C → identity, λ = 0.0051", 16)
    d.text(767, a + 134, "ẑ: (z − mean_b) / σ_b", 16)
    y = d.ranks(340, ["torchrun ranks", "Z^A, Z^B of all ranks gathered with gradient: C over the global batch N, the same loss on",
                      "every rank (1 GPU ≡ W GPUs; the official code all-reduces C without gradient). SyncBN in f_θ."])
    d.legend(y + 22)
    return d


def vicreg():
    d = Diagram("vicreg", 644, "VICReg: one training step of vicreg.py",
                "The image x gives two views, X and X′, by two augmentations (t, t′ ∼ 𝒯, BYOL's, whose blur and "
                "solarization probabilities may differ between the views). Both pass through the one "
                "encoder f_θ (a ResNet), giving the representations Y and Y′, and the one expander h_φ (three "
                "Linear layers, BN and ReLU on the first two), giving the embeddings Z and Z′, each view its own BN "
                "batch. Z and Z′ are gathered from all ranks with gradient and the loss, in the official code's "
                "form, is computed on the global batch: λ s(Z, Z′) + μ [v(Z) + v(Z′)]/2 + ν [c(Z) + c(Z′)], with s "
                "the mean squared error, v a hinge on each dimension's standard deviation and c the sum of the "
                "squared off-diagonal covariances over d; λ = μ = 25, ν = 1.")
    a, b = 100, 250
    two_views(d, a, b, ("X", "X′"))
    for y in (a, b):
        d.line([(160, y), (185, y)])
    d.box(185, a - 35, 95, b - a + 70, ["f_θ", "ResNet"], "online")
    d.line([(280, a), (310, a)], label="Y", at=(295, a - 10))
    d.line([(280, b), (310, b)], label="Y′", at=(295, b - 10))
    d.box(310, a - 35, 115, b - a + 70, ["h_φ", "expander"], "online")
    d.line([(425, a), (455, a)], label="Z", at=(440, a - 10))
    d.line([(425, b), (455, b)], label="Z′", at=(440, b - 10))
    d.box(455, a - 35, 105, b - a + 70, ["gather", "with", "gradient", "N × d"], "gather", 16)
    for y, z in ((a, "Z"), (b, "Z′")):
        d.line([(560, y), (595, y)])
        d.box(595, y - 35, 290, 70, [f"v({z}), c({z})", "variance, covariance"], "loss")
    d.line([(577, a), (577, (a + b) / 2), (595, (a + b) / 2)])
    d.line([(577, b), (577, (a + b) / 2)], arrow=False)
    d.box(595, (a + b) / 2 - 25, 290, 50, ["s(Z, Z′) invariance"], "loss")
    d.box(185, 308, 700, 100, [], "loss")
    d.text(535, 334, "ℓ = λ s(Z, Z′) + μ [v(Z) + v(Z′)] / 2 + ν [c(Z) + c(Z′)], λ = μ = 25, ν = 1", 17, weight="bold")
    d.text(535, 362, "s = mse(Z, Z′), a mean over N·d; v(Z) = (1/d) Σ_j max(0, 1 − √(Var(z^j) + ε))", 16)
    d.text(535, 392, "c(Z) = (1/d) Σ_{i≠j} C(Z)_{ij}², C(Z) the covariance of Z over the batch", 16)
    y = d.ranks(425, ["torchrun ranks", "Z, Z′ of all ranks gathered with gradient: the three terms over the global batch N,",
                      "the same loss on every rank (1 GPU ≡ W GPUs). SyncBN in f_θ and h_φ."])
    d.legend(y + 22)
    return d


def unigrad():
    d = Diagram("unigrad", 794, "UniGrad: one training step of unigrad.py",
                "The image x gives two views, x_1 and x_2, by the same augmentation. Each view goes through the "
                "online network θ (a ResNet and a three-layer projector, no predictor) and an L2 normalisation, "
                "giving u_1^o and u_2^o, and, without gradient, through the momentum network θ_m, first updated as "
                "θ_m ← m θ_m + (1 − m) θ with m rising from 0.996 to 1 by a cosine, giving u_1^m and u_2^m. The "
                "matrix F, a moving average of the correlation of the momentum embeddings, is updated with this "
                "batch, its batch term averaged over all ranks: F ← ρF + (1 − ρ) Σ_b (u_1^m u_1^mᵀ + u_2^m u_2^mᵀ)/2N "
                "(F ← the batch term at the first step). "
                "The surrogate loss ½ [⟨sg(g_1), u_1^o⟩ + ⟨sg(g_2), u_2^o⟩], averaged over the batch, with "
                "g_1 = −u_2^m + λ F u_1^o and g_2 = −u_1^m + λ F u_2^o, has the gradient UniGrad prescribes.")
    lanes = on1, on2, m1, m2 = 85, 150, 290, 355
    four_lanes(d, lanes, ("x_1", "x_2"), ("t ∼ 𝒯", "t′ ∼ 𝒯"))
    d.text(195, 38, "online network θ", 17, "start", "#1d4ed8", "bold")
    d.text(195, 418, "momentum network θ_m (no gradient)", 17, "start", ORANGE, "bold")
    for kind, top, bottom in (("online", on1, on2), ("target", m1, m2)):
        style = "grad" if kind == "online" else "sg"
        d.box(195, top - 30, 85, bottom - top + 60, ["ResNet"], kind)
        d.box(305, top - 30, 105, bottom - top + 60, ["projector"], kind)
        for y in (top, bottom):
            d.line([(280, y), (305, y)], style)
            d.line([(410, y), (425, y)], style)
            d.box(425, y - 20, 50, 40, ["‖·‖"], "op")
    for x in (237, 357):
        d.line([(x, on2 + 30), (x, m1 - 30)], "ema")
    d.text(372, 205, "① each step, first:", 16, "start", ORANGE)
    d.text(372, 228, "θ_m ← m θ_m + (1 − m) θ", 17, "start", ORANGE)
    d.text(372, 251, "m: 0.996 → 1 (cosine)", 16, "start", ORANGE)
    for y, u, style in ((on1, "u_1^o", "grad"), (on2, "u_2^o", "grad"), (m1, "u_1^m", "sg"), (m2, "u_2^m", "sg")):
        d.line([(475, y), (600, y)], style, label=u, at=(555, y - 9))
    for y in (m1, m2):
        d.line([(505, y), (505, 505)], "sg", arrow=False)
    d.line([(505, 505), (530, 505)], "sg")
    d.box(530, 436, 355, 138, ["② F (d × d), moving average", "F ← ρF + (1 − ρ) F_{batch}",
                               "F_{batch} = (1/2N) Σ_u u uᵀ over the", "2N embeddings u_1^m, u_2^m, all ranks"],
          "gather", 16, gap=11)
    d.line([(742, 436), (742, 410)], "sg", label="F", at=(756, 430), anchor="start")
    d.box(600, 45, 285, 365, [], "loss")
    d.text(742, 72, "③ surrogate loss", 17, weight="bold")
    d.text(742, on1 + 26, "g_1 = −u_2^m + λ F u_1^o", 17)
    d.text(742, on2 + 26, "g_2 = −u_1^m + λ F u_2^o", 17)
    d.text(742, 216, "L = ½ [⟨sg(g_1), u_1^o⟩", 17)
    d.text(742, 240, "+ ⟨sg(g_2), u_2^o⟩], batch mean", 17)
    d.text(742, 274, "∂L/∂u_1^o ∝ −u_2^m + λ F u_1^o", 16, weight="bold")
    d.text(742, 385, "λ = 100, ρ = 0.99", 16)
    y = d.ranks(592, ["torchrun ranks", "F's batch term averaged over all ranks (all-reduce, no gradient): F is the same on every",
                      "rank. Nothing else gathered but BN statistics (SyncBN in both networks)."])
    d.legend(y + 22)
    return d


DIAGRAMS = {"mocov1": lambda: moco(1), "mocov2": lambda: moco(2), "simclr": simclr, "byol": byol, "simsiam": simsiam,
            "barlow": barlow, "vicreg": vicreg, "unigrad": unigrad}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in DIAGRAMS.items():
        (OUT / f"{name}.svg").write_text(draw().svg(), encoding="utf-8")


if __name__ == "__main__":
    main()
