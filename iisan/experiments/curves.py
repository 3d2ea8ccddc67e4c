"""Training curves of runs as a figure (``iisan results --curves``): validation HR@10 and training loss
per epoch, one line per run, the best-validation epoch marked. A figure is written atomically and
replaces only one this command drew (its Creator metadata)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_path, claim_output

CREATOR = "IISAN results"  # in the metadata of every figure ``draw_curves`` writes, where its format has any
SIGNED_FORMATS = ("png", "pdf", "svg", "eps", "ps")


def claim_figure(path: str | Path) -> None:
    """A file already at ``path`` may be replaced only when it is a figure IISAN drew (its Creator metadata)."""
    claim_output(path, lambda p: p.is_file() and CREATOR.encode() in p.read_bytes(), "a figure IISAN drew",
                 "--curves", overwrite=True)


def figure_format(path: str | Path, flag: str = "--curves") -> str:
    """The image format ``path``'s suffix names (none: png); one that matplotlib cannot write is one line."""
    from matplotlib.backend_bases import FigureCanvasBase  # deferred: heavy

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise ConfigError(f"{flag} {path}: {fmt!r} is not an image format matplotlib writes; use a suffix such "
                          f"as .png, .pdf or .svg ({', '.join(sorted(known))})")
    return fmt


def draw_curves(curves: dict[str, dict[str, list]], path: str | Path) -> None:
    """Validation HR@10 and training loss per epoch, one line per run, the best-validation epoch
    marked; written atomically to ``path`` (PNG)."""
    if not any(s["epoch"] for s in curves.values()):
        raise ConfigError(f"--curves {path}: none of the runs has a finished epoch to plot")
    import matplotlib  # deferred: heavy, and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg back end (no display here)

    fig, (hit_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, s in curves.items():
        (line,) = hit_ax.plot(s["epoch"], s["valid_hit@10"], marker=".", label=name)
        if s["best_epoch"] in s["epoch"]:
            best = s["epoch"].index(s["best_epoch"])
            hit_ax.plot(s["best_epoch"], s["valid_hit@10"][best], "*", markersize=12, color=line.get_color())
        loss_ax.plot(s["epoch"], s["loss"], marker=".", label=name, color=line.get_color())
    hit_ax.set(title="validation HR@10 (star: best epoch, where test is reported)", xlabel="epoch")
    loss_ax.set(title="training loss", xlabel="epoch")
    hit_ax.legend(fontsize=7)
    for ax in (hit_ax, loss_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    claim_figure(path)
    fmt = figure_format(path)
    signed = {"metadata": {"Creator": CREATOR}} if fmt in SIGNED_FORMATS else {}  # others have no metadata
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=fmt, **signed)
    plt.close(fig)
