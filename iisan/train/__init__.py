"""Training: the step (``step``, whole-step CUDA graphs in ``graphs``), the trainer that runs epochs,
evaluates, checkpoints and resumes (``trainer``, with ``progress``, ``records``, ``weights``,
``checkpoint``, ``runstate``), and stopping on request (``interrupt``)."""
