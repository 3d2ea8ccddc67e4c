"""Training curves of runs as a figure (``iisan results --curves``): validation HR@10 and training loss
per epoch, one line per run, the best-validation epoch marked. A figure is written atomically and
replaces only one this command drew: its creator, in the field its format keeps it in (``creator``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..claims import claim_output
from ..errors import ConfigError
from ..files import atomic_path
from ..metric_names import SELECTED_BY, VALID_COLUMN, label

CREATOR = "IISAN results"  # in the metadata of every figure ``draw_curves`` writes, where its format has any
SIGNED_FORMATS = ("png", "pdf", "svg", "eps", "ps")
# The namespaces of the SVG metadata matplotlib writes (RDF, Dublin Core, Creative Commons).
SVG_NAMES = {"svg": "http://www.w3.org/2000/svg", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
             "dc": "http://purl.org/dc/elements/1.1/", "cc": "http://creativecommons.org/ns#"}


def creator(path: Path, fmt: str) -> str | None:
    """The creator a figure of format ``fmt`` names in its metadata, where matplotlib's ``savefig(metadata=...)``
    puts it: a PNG's Creator text chunk, a PDF's Creator in its Info dictionary, an SVG's
    ``metadata/rdf:RDF/cc:Work/dc:creator/cc:Agent/dc:title``, a PostScript file's ``%%Creator:`` header
    comment. None for another format, or a file that is not of ``fmt`` or names no creator."""
    # deferred: only a file already at the figure's path is read, with the one reader its format needs
    from xml.etree import ElementTree

    from PIL import Image  # deferred too: PNG and PDF figures only
    from PIL.PdfParser import PdfParser

    try:
        if fmt == "png":
            with Image.open(path, formats=["PNG"]) as image:  # the text chunks before the pixels; none decoded
                return image.info.get("Creator")
        if fmt == "pdf":
            with PdfParser(filename=path) as pdf:  # the trailer's Info dictionary, found through the xref table
                return pdf.info[b"Creator"].decode("latin-1")
        if fmt == "svg":
            return ElementTree.parse(path).getroot().findtext(
                "svg:metadata/rdf:RDF/cc:Work/dc:creator/cc:Agent/dc:title", namespaces=SVG_NAMES)
        if fmt in ("eps", "ps"):
            with open(path, "rb") as fh:  # the header comments: the first line to %%EndComments
                lines = fh.read(1 << 16).split(b"%%EndComments", 1)[0].splitlines()
            said = [line.removeprefix(b"%%Creator: ") for line in lines if line.startswith(b"%%Creator: ")]
            return said[0].decode("latin-1") if lines[0].startswith(b"%!PS-Adobe") and said else None
    except Exception:  # not a file of that format, or a damaged one (PIL raises assorted types): no creator
        return None
    return None


def claim_figure(path: str | Path) -> None:
    """A file already at ``path`` may be replaced only when it is a figure IISAN drew: its creator field
    (``creator``, read in the format ``path``'s suffix names) is exactly ``CREATOR``."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"  # the format draw_curves writes there (figure_format)
    claim_output(path, lambda p: p.is_file() and creator(p, fmt) == CREATOR, "a figure IISAN drew", "--curves",
                 overwrite=True)


def figure_format(path: str | Path, flag: str = "--curves") -> str:
    """The image format ``path``'s suffix names (none: png); one that matplotlib cannot write is one line."""
    from matplotlib.backend_bases import FigureCanvasBase  # deferred: heavy

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise ConfigError(f"{flag} {path}: {fmt!r} is not an image format matplotlib writes; use a suffix such "
                          f"as .png, .pdf or .svg ({', '.join(sorted(known))})")
    return fmt


LINES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # past each round of colours: the next style


def run_styles(n: int) -> list[dict]:
    """The colour, line style and marker of each of ``n`` runs' lines, all different up to 40 runs: ten
    colours colour-blind readers tell apart too (matplotlib's tableau-colorblind10), then round again with
    another line style and marker."""
    import matplotlib.style  # deferred: heavy, and only drawing needs it

    colours = matplotlib.style.library["tableau-colorblind10"]["axes.prop_cycle"].by_key()["color"]
    return [{"color": colours[i % len(colours)], "linestyle": LINES[i // len(colours) % len(LINES)][0],
             "marker": LINES[i // len(colours) % len(LINES)][1]} for i in range(n)]


LABEL = 48  # the longest legend label drawn whole: past it, the figure's panels would shrink to make room


def legend_labels(names: list[str], most: int = LABEL) -> tuple[str, list[str]]:
    """The legend's title and its labels of ``names``: the start all of them share, to a ``-``, ``_`` or ``/``
    (a sweep's method, feed and data set), is the title, and each label the rest; a label still longer than
    ``most`` characters keeps its start and its end around "...", unless it would then read as another's."""
    common = os.path.commonprefix(names) if len(names) > 1 else ""
    common = common[:max(common.rfind(sep) for sep in "-_/") + 1]
    rest = [name[len(common):] for name in names]
    if any(not r or r.startswith("_") for r in rest):  # (matplotlib leaves a label that starts with _ out)
        common, rest = "", list(names)

    def cut(text: str) -> str:
        half = (most - 3) // 2
        return text if len(text) <= most else f"{text[:half]}...{text[-(most - 3 - half):]}"

    short = [cut(r) for r in rest]
    return cut(common), [s if short.count(s) == 1 else r for s, r in zip(short, rest)]


def draw_curves(curves: dict[str, dict[str, list]], path: str | Path) -> None:
    """Validation HR@10 and training loss per epoch, one line per run, the best-validation epoch
    marked; written atomically to ``path`` (PNG)."""
    if not any(s["epoch"] for s in curves.values()):
        raise ConfigError(f"--curves {path}: none of the runs has a finished epoch to plot")
    import matplotlib.ticker  # deferred: heavy, and only drawing needs it
    from matplotlib.figure import Figure  # drawn without pyplot: no backend is chosen (a notebook's stays its own)

    claim_figure(path)  # refused before anything is drawn
    fmt = figure_format(path)
    drawn = {name: s for name, s in curves.items() if s["epoch"]}  # a run failed before its first epoch: no line
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    hit_ax, loss_ax = fig.subplots(1, 2)
    title, labels = legend_labels(list(drawn))
    for s, shown, style in zip(drawn.values(), labels, run_styles(len(drawn)), strict=True):
        hit_ax.plot(s["epoch"], s[VALID_COLUMN], markersize=4, label=shown, **style)
        if s["best_epoch"] in s["epoch"]:
            best = s["epoch"].index(s["best_epoch"])
            hit_ax.plot(s["best_epoch"], s[VALID_COLUMN][best], "*", markersize=13, color=style["color"],
                        markeredgecolor="black", markeredgewidth=0.5)
        loss_ax.plot(s["epoch"], s["loss"], markersize=4, **style)
    hit_ax.set(title=f"validation {label(SELECTED_BY)} (star: best epoch, where test is reported)", xlabel="epoch",
               ylabel=label(SELECTED_BY))
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="in-batch softmax loss")
    # beside the panels, not over the lines: one column per 20 runs
    fig.legend(loc="outside right upper", fontsize=7, ncols=1 + (len(drawn) - 1) // 20, title=title or None,
               title_fontsize=7)
    for ax in (hit_ax, loss_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    signed = {"metadata": {"Creator": CREATOR}} if fmt in SIGNED_FORMATS else {}  # others have no metadata
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=fmt, **signed)
