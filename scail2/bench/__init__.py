"""Quality benchmarks: generate (or collect) videos for a benchmark's cases, score them, report.

Importing this package loads nothing; use the submodules:

- ``scail2.bench.cases``: `Case`, `VideoFrame` and the layout errors.
- ``scail2.bench.loaders``: the X-Dance, Studio-Bench-style and synthetic layouts -> lists of cases.
- ``scail2.config.bench`` (outside this package): the structured schema of ``scail2-bench`` and its composition,
  built on the same config machinery as training's.
- ``scail2.bench.scoring``: aligning a generated video with its ground truth, frame metrics, FVD, the judge.
- ``scail2.bench.gsb``: Good/Same/Bad human studies: blinded side-by-side export and aggregation.
- ``scail2.bench.study``, ``study_server``, ``study_report``: the same study in the browser: the study folder,
  per-rater blinding, the answers database, the web server, and the analysis with its chart and report.
- ``scail2.bench.published``: the paper's published numbers and the protocols behind them.
- ``scail2.bench.report``: results.json / .csv / .md, plots and the self-contained report.html.
- ``scail2.bench.runner``: `run_benchmark`, the whole run including MLflow logging.
- ``scail2.bench.synthetic_motion``: motion transfer on held-out synthetic pairs against their exact ground truth,
  with the reference-still, shuffled-driving and untrained baselines (``docs/training.md``).
- ``scail2.bench.synthetic_hands``: hands of samples on held-out synthetic preference pairs against the true hand
  joints, for base / SFT-only / DPO networks (``docs/training.md``). Both report their statistics with
  `scail2.utils.stats` (mean and standard error over pairs, paired differences).

How to run each benchmark and the folder layouts: ``docs/benchmarks-quality.md``.
"""
