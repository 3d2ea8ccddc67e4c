"""What a reader of a figure meets: text that runs into other text, or out of the canvas."""

from __future__ import annotations


def clashes(fig) -> list[str]:
    """The visible tick labels, titles, axis labels and legend texts of ``fig`` (a matplotlib Figure, laid out as
    when saved) that overlap another of them, or reach past the figure's edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # (a Figure drawn without pyplot has no canvas that renders)
    canvas.draw()  # lays it out (constrained layout included), as savefig does
    renderer = canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (*ticks(ax), ax.title, ax.xaxis.label, ax.yaxis.label)]
    texts += [t for legend in (*fig.legends, *(ax.get_legend() for ax in fig.axes)) if legend for t in legend.texts]
    texts += [fig._suptitle] if fig._suptitle else []
    shown = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]
    edge = fig.bbox
    found = [f"{text!r} reaches past the figure's edge" for text, box in shown
             if box.x0 < edge.x0 - 1 or box.x1 > edge.x1 + 1 or box.y0 < edge.y0 - 1 or box.y1 > edge.y1 + 1]
    for i, (a, box_a) in enumerate(shown):
        for b, box_b in shown[i + 1:]:
            if box_a.overlaps(box_b):
                found.append(f"{a!r} overlaps {b!r}")
    return found


def ticks(ax) -> list:
    """The tick labels ``ax`` draws: those of its ticks inside its view (matplotlib keeps the others, unseen)."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    return [t for minor in (False, True) for t in ax.get_xticklabels(minor=minor) if x0 <= t.get_position()[0] <= x1] \
        + [t for minor in (False, True) for t in ax.get_yticklabels(minor=minor) if y0 <= t.get_position()[1] <= y1]
