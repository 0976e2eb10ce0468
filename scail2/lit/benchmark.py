"""The synthetic motion benchmark as a training callback (`MotionBenchmark`, ``callbacks.motion_benchmark`` of
``experiment=demo``): at the end of a run, the trained network, the baselines and the network the run started
from are scored on held-out synthetic pairs (`scail2.bench.synthetic_motion`); the results and the labelled
sample grid go to ``<run_dir>/benchmark/``, the figures to the run's loggers (``bench/<metric>/<method>``) and
to the end-of-run summary (`summary_lines`: before -> after and the baselines)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from scail2.lit.evaluation import Evaluation

log = logging.getLogger(__name__)


class MotionBenchmark(Evaluation):
    """Args:
        out_dir: where ``results.json`` and ``grid.png`` go.
        heldout: the held-out synthetic folder (None: the data module's ``heldout_manifest`` folder, which
            ``data=synthetic`` writes with ``data.heldout_pairs``; without one the benchmark is skipped, saying so).
        encoders: the encoders folder whose VAE, text and image encoders condition and decode (None: the data
            module's ``encoders_dir``).
        max_cases: the first N held-out pairs (None: all).
        pixels: also score decoded pixels (None: when the data module's ``vae`` is "trained"; the random tiny
            VAE's decoder does not reconstruct, so only the latent measure is meaningful with it).
        steps, shift, scheduler, seed, batch, grid_cases, grid_frames: `MotionBenchmarkConfig`.

    The start of the run ("before", baseline (c)) is the network the module's factory builds under its seed
    (what `SCAIL2Module.configure_model` starts from), or, for a run from ``module.init_from``, a copy of the
    network taken when the run starts (such a run resumed has no start to compare with). It samples in one
    process: runs on more are skipped, saying so.
    """

    def __init__(
        self,
        out_dir: str,
        heldout: str | None = None,
        encoders: str | None = None,
        max_cases: int | None = None,
        pixels: bool | None = None,
        steps: int = 20,
        shift: float = 3.0,
        scheduler: str = "unipc",
        seed: int = 0,
        batch: int = 8,
        grid_cases: int = 6,
        grid_frames: int = 3,
    ):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.heldout = Path(heldout) if heldout is not None else None
        self.encoders = Path(encoders) if encoders is not None else None
        self.max_cases = max_cases
        self.pixels = pixels
        self.settings = dict(steps=steps, shift=shift, scheduler=scheduler, seed=seed, batch=batch, grid_cases=grid_cases, grid_frames=grid_frames)
        self.skipped: str | None = None
        self._start: torch.nn.Module | None = None

    def _heldout(self, trainer: Any) -> Path | None:
        if self.heldout is not None:
            return self.heldout
        manifest = getattr(trainer.datamodule, "heldout_manifest", None)
        return Path(manifest).parent if manifest is not None else None

    def _encoders(self, trainer: Any) -> Path:
        found = self.encoders or getattr(trainer.datamodule, "encoders_dir", None)
        if found is None:
            raise ValueError("the motion benchmark needs the encoders of the data: set callbacks.motion_benchmark.encoders")
        return Path(found)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.fast_dev_run or trainer.world_size > 1:
            return
        heldout = self._heldout(trainer)
        if heldout is None:
            self.skipped = "not run: the data has no held-out pairs (data=synthetic with data.heldout_pairs > 0)"
            return
        # What would fail after training fails now: the held-out set must exist and hold every baseline's pairs.
        from scail2.bench.synthetic_motion import check_heldout

        check_heldout(heldout, self.max_cases)
        self._encoders(trainer)
        if pl_module.global_step == 0 and pl_module.init_from is not None:
            # Weights loaded at the start cannot be rebuilt from the factory: keep a copy of them.
            self._start = copy.deepcopy(pl_module.net).cpu().eval()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # After every on_train_end: the export and the last checkpoint are written before the benchmark runs,
        # so an error here loses neither.
        if trainer.fast_dev_run or self.skipped is not None:
            return
        # A sharded network cannot sample on one rank alone; benchmark its export instead.
        self.skipped = self.one_process_only(trainer, "motion benchmark")
        if self.skipped is not None:
            return
        with self.timed():
            self.history.append(self.run(trainer, pl_module))
        metrics = {
            f"bench/{metric}/{method}": entry["mean"]
            for metric, table in self.history[-1]["metrics"].items()
            for method, entry in table.items()
            if entry["n"]
        }
        if trainer.global_rank == 0:
            log.info("motion benchmark on %d held-out pairs: %s", self.history[-1]["pairs"], self.out_dir)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @torch.no_grad()
    def run(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        from scail2.bench.synthetic_motion import MotionBenchmarkConfig, load_cases, run_motion_benchmark, untrained_like
        from scail2.encoders.bundle import Encoders
        from scail2.pipeline import SCAIL2Pipeline

        heldout, encoders = self._heldout(trainer), self._encoders(trainer)
        pixels = self.pixels if self.pixels is not None else getattr(trainer.datamodule, "vae", None) == "trained"
        device = pl_module.device
        start = self._start
        if start is None and pl_module.init_from is None:
            start = untrained_like(pl_module.net_factory, pl_module.seed)
        if start is not None:
            start = start.to(device)
        cases = load_cases(heldout, self.max_cases)
        enc = Encoders.from_pretrained(encoders, device=device)
        pipe = SCAIL2Pipeline(pl_module.net, enc.vae, enc.text, enc.image)
        config = MotionBenchmarkConfig(pixels=pixels, **self.settings)
        results = run_motion_benchmark(pipe, cases, pl_module.net, start, config, self.out_dir)
        results["step"] = trainer.global_step
        self._start = None
        return results

    def summary_lines(self) -> list[str]:
        """The figures and files for the end-of-run summary (empty before the run ends)."""
        if self.skipped is not None:
            return [f"Held-out synthetic pairs: motion benchmark {self.skipped}."]
        if not self.history:
            return []
        from scail2.bench.synthetic_motion import format_report

        results = self.history[-1]
        lines = format_report(results, f"Held-out synthetic pairs, motion transfer after step {results['step']} (before: the network at the start)")
        if not results["config"]["pixels"]:
            lines.append("  (latent measure only: pixel measures need a VAE that reconstructs, data.vae=trained)")
        if "files" in results:
            lines.append(f"  results         {results['files']['results']}")
            lines.append(f"  samples         {results['files']['grid']}  (reference | driving | target | sample)")
        return lines
