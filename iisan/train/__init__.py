"""Training: what a config needs (``parts``: the model, the optimizer with its learning-rate groups in
``optim``, and how steps run in ``plan``), the step (``step``, whole-step CUDA graphs in ``graphs``), the
trainer that runs epochs, evaluates, checkpoints and resumes (``trainer``, with ``progress``, ``records``,
``weights``; checkpoints: ``checkpoint``, ``checkpoint_writing``, ``resuming``, ``runstate``; rank 0's
choices under torchrun: ``decisions``; a non-finite loss explained: ``nonfinite``), run folders and their
names (``runfolder``, ``runnames``; whether a folder's run read the same inputs: ``same_inputs``; its results.json read
back: ``run_results``), what a run writes while it runs (``records``: train.log, metrics.jsonl,
results.json), and stopping on request (``interrupt``)."""
