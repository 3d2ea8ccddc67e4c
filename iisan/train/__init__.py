"""Training: the step (``step``, whole-step CUDA graphs in ``graphs``), the trainer that runs epochs,
evaluates, checkpoints and resumes (``trainer``, with ``progress``, ``records``, ``weights``,
``checkpoint``, ``runstate``; a non-finite loss explained: ``nonfinite``), run folders and their names
(``runfolder``), what a run writes while it runs (``records``: train.log, metrics.jsonl, results.json),
and stopping on request (``interrupt``)."""
