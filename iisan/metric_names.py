"""The ranking metrics by name, in one place: the cut-offs evaluation computes, the validation metric
that chooses the best epoch, and the metrics that log lines and tables show.

``evaluate.metrics_from_ranks`` computes ``hit@K`` and ``ndcg@K`` for every K in ``KS``; results.json
keeps all of them. To choose epochs by another metric, or to show more of them, change the names here.
"""

from __future__ import annotations

import re

KS = (5, 10, 20)
SELECTED_BY = "hit@10"  # the validation metric that picks the best epoch and stops early (the paper's HR@10)
UNSAID = "hit@10"  # what chose the best epoch of checkpoints and results files that do not say (all before it)
VALID_COLUMN = f"valid_{SELECTED_BY}"  # its column in `iisan results` and its curve: valid_hit@10
HEADLINE = ("hit@10", "ndcg@10")  # what an epoch line, a run's summary, the demo and a seed table show of a split
TABLED = ("hit@10", "ndcg@10", "hit@20", "ndcg@20")  # the test metrics of `iisan results` and reproduce's table


def label(metric: str) -> str:
    """``hit@10`` -> ``HR@10``, ``ndcg@20`` -> ``NDCG@20``: a metric as the paper and the tables name it."""
    name, at, k = metric.partition("@")
    return {"hit": "HR", "ndcg": "NDCG"}.get(name, name) + at + k


def stored(name: str) -> str:
    """``label``'s inverse, in either case, wherever it stands in a column's name: ``valid_HR@10`` ->
    ``valid_hit@10``."""
    return re.sub(r"(?i)(^|_)(hr|hit|ndcg)@", lambda m: m[1] + {"hr": "hit"}.get(m[2].lower(), m[2].lower()) + "@",
                  name)
