"""Held-out preference evaluation of DPO: implicit accuracy, DPO loss and reward margin on fixed pairs.

`HeldOutPreferences` is the callback (an `Evaluation`: its time is not counted as training time) that
`scail2.lit.dpo.DPOModule` attaches when its ``heldout`` argument names a set of pairs the run never trains on
(or, naming none, when the data module has a held-out set of its own: ``heldout_cache_dir``).
The pairs come from the data layer (`PreferenceDataModule.fixed_batches`): the held-out set of ``heldout``
and, with ``heldout.training_pairs``, as many pairs of the training data module (``trainpairs/*``: whether the
optimisation itself works). It measures before training (step 0 of a fresh run), every
``heldout.every_n_steps`` optimizer steps and after training, each pair under ``heldout.draws`` fixed noise /
timestep draws (the same ones at every evaluation).

The implicit accuracy is reported with its standard error over pairs (``<set>/implicit_accuracy_se``): each
pair's accuracy is averaged over its draws, and the error is the sample standard deviation of these per-pair
values over sqrt(pairs). Pairs, not draws, are the independent units: the draws of one pair share its content.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scail2.data.batch import PreferenceBatch
from scail2.lit.evaluation import Evaluation, model_in_eval
from scail2.utils.stats import mean_se

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOutConfig:
    """Held-out preference pairs for validation: a cache folder or a manifest (+ encoders); neither: the data
    module's own held-out set when it has one (``heldout_cache_dir``, e.g. ``data=synthetic_preference``), else
    no held-out evaluation."""

    cache_dir: str | None = None
    manifest: str | None = None
    encoders_root: str | None = None
    num_pairs: int | None = 16  # distinct pairs measured (a seeded choice); None: every pair of the set
    batch_size: int = 4
    seed: int = 4321
    # Noise / timestep draws per pair: the implicit accuracy of one draw is a coin flip weighted by a small
    # margin, so each pair is scored under several fixed draws (the same ones at every evaluation).
    draws: int = 4
    every_n_steps: int | None = None  # also evaluate every n optimizer steps (always before and after training)
    training_pairs: bool = False  # also measure num_pairs of the training pairs (``trainpairs/*``)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"heldout.every_n_steps is {self.every_n_steps}; need at least 1 (or null)")
        for name in ("num_pairs", "batch_size", "draws"):
            if (name != "num_pairs" or self.num_pairs is not None) and getattr(self, name) < 1:
                raise ValueError(f"heldout.{name} is {getattr(self, name)}; need at least 1")

    @property
    def configured(self) -> bool:
        """Whether a held-out set is named (a cache folder or a manifest)."""
        return self.cache_dir is not None or self.manifest is not None


class HeldOutPreferences(Evaluation):
    """Measures a DPO module (``pl_module.preference_loss(batch, generator) -> DPOOutput``) on fixed
    preference pairs; ``history``: one ``{"step": s, "<set>/<metric>": value, ...}`` per evaluation."""

    def __init__(self, cfg: HeldOutConfig):
        super().__init__()
        if not cfg.configured:
            raise ValueError("HeldOutPreferences needs heldout.cache_dir (a preference cache) or heldout.manifest")
        self.cfg = cfg
        self._sets: dict[str, list[PreferenceBatch]] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.fast_dev_run and trainer.global_step == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n, step = self.cfg.every_n_steps, trainer.global_step
        if n is None or trainer.fast_dev_run:
            return
        # The last step is measured in on_train_end.
        if step % n == 0 and step != trainer.max_steps and self.last_step != step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.fast_dev_run and self.last_step != trainer.global_step:
            self.run(trainer, pl_module)

    def evaluation_sets(self, trainer: Any) -> dict[str, list[PreferenceBatch]]:
        """``{"heldout": batches}`` (and ``"trainpairs"`` with ``training_pairs``), read once."""
        if self._sets is None:
            from scail2.preference.datamodule import PreferenceDataModule

            h = self.cfg
            held = PreferenceDataModule(
                manifest=h.manifest, cache_dir=h.cache_dir, encoders_root=h.encoders_root, num_workers=0, seed=h.seed
            )
            sets = {"heldout": self._batches(held, "held-out")}
            if h.training_pairs:
                dm = trainer.datamodule
                if not isinstance(dm, PreferenceDataModule):
                    raise ValueError(
                        f"module.heldout.training_pairs measures pairs of the training data module, which is a "
                        f"{type(dm).__name__}, not a PreferenceDataModule; set module.heldout.training_pairs=false"
                    )
                # The same measurement on pairs the run trains on: whether the optimisation itself works.
                sets["trainpairs"] = self._batches(dm, "training")
            self._sets = sets
        return self._sets

    def _batches(self, dm: Any, what: str) -> list[PreferenceBatch]:
        h = self.cfg
        return dm.fixed_batches(h.num_pairs, h.batch_size, h.seed, what, setting="module.heldout.num_pairs")

    @torch.no_grad()
    def run(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        """Measure every set at the current step; log and return the metrics."""
        step = trainer.global_step
        self.last_step = step
        with self.timed():
            sets = self.evaluation_sets(trainer)
            with model_in_eval(trainer, pl_module.net):
                metrics = self._measure(sets, pl_module)
            self.history.append({"step": float(step), **metrics})
            self.publish(trainer, "held-out", metrics)
        return metrics

    def _measure(self, sets: dict[str, list[PreferenceBatch]], pl_module: Any) -> dict[str, float]:
        h = self.cfg
        metrics: dict[str, float] = {}
        for name, batches in sets.items():
            per_pair: list[torch.Tensor] = []  # (B,) per batch: each pair's accuracy averaged over the draws
            loss, margin, n = 0.0, 0.0, 0
            for i, batch in enumerate(batches):
                batch = batch.to(pl_module.device)
                acc = torch.zeros(batch.batch_size, dtype=torch.float64)
                for d in range(h.draws):
                    out = pl_module.preference_loss(batch, torch.Generator().manual_seed(h.seed + 100_003 * d + i))
                    b = batch.batch_size
                    acc += out.pair_accuracy.detach().double().cpu()
                    loss += float(out.dpo_loss) * b
                    margin += float(out.reward_margin) * b
                    n += b
                per_pair.append(acc / h.draws)
            accuracy = mean_se(torch.cat(per_pair).tolist())
            metrics.update({
                f"{name}/implicit_accuracy": accuracy["mean"], f"{name}/implicit_accuracy_se": accuracy["se"],
                f"{name}/dpo_loss": loss / n, f"{name}/reward_margin": margin / n,
            })  # fmt: skip
        return metrics


class HeldOutHands(Evaluation):
    """At the end of a DPO run: the hands of samples on the held-out preference pairs against the synthetic
    ground truth (`scail2.bench.synthetic_hands`), for the post-trained network (``dpo``; ``sft`` for an SFT-only
    run, ``objective.dpo_weight=0``), the base (the same network with its adapters disabled) and the networks of
    ``compare`` (name -> a network folder, e.g. the merged export of an SFT-only run on the same winners),
    all from the same noise. The trained network is compared with each (paired differences over the pairs, "beaten"
    at more than twice their standard error). Writes ``out_dir/results.json``, logs ``hands/<metric>/<name>`` and
    prints the report at the end of the run (``summary_lines``).

    Needs a ``data=synthetic_preference`` data module (its held-out cache and pairs, and its dataset seed, whose
    source videos give the true hand joints) and one process (the sampler runs the whole network on one rank).

    Args:
        out_dir: where results.json goes.
        num_pairs: held-out pairs sampled (a seeded choice, as `HeldOutConfig`); None: all of them.
        compare: name -> network folder (`scail2.models.load_transformer`) scored alongside.
        encoders: the encoders folder whose VAE decodes the samples for the pixel error (None: the data
            module's; the pixel error needs a VAE that reconstructs, ``data.vae=trained``).
        pixels: also decode and measure the pixel error.
        seed, steps, shift, scheduler, guidance_scale, batch_size, disc: `HandBenchmarkConfig` (``seed`` also
            chooses the pairs).
    """

    def __init__(
        self,
        out_dir: str,
        num_pairs: int | None = None,
        compare: dict[str, str] | None = None,
        encoders: str | None = None,
        pixels: bool = True,
        seed: int = 0,
        steps: int = 20,
        shift: float = 3.0,
        scheduler: str = "unipc",
        guidance_scale: float = 1.0,
        batch_size: int = 8,
        disc: float = 1.5,
    ):
        super().__init__()
        from scail2.bench.synthetic_hands import HandBenchmarkConfig

        if num_pairs is not None and num_pairs < 2:
            raise ValueError(f"callbacks.hands.num_pairs is {num_pairs}; a standard error needs at least 2 pairs (or null: all)")
        self.out_dir = Path(out_dir)
        self.num_pairs = num_pairs
        self.compare = {str(k): Path(v) for k, v in (compare or {}).items()}
        reserved = {"dpo", "sft", "base", "dispreferred", "vae_reconstruction"} & set(self.compare)
        if reserved:
            raise ValueError(f"callbacks.hands.compare names {sorted(reserved)}, which the benchmark uses itself; rename them")
        self.encoders = Path(encoders) if encoders is not None else None
        self.pixels = pixels
        self.config = HandBenchmarkConfig(steps=steps, shift=shift, scheduler=scheduler, guidance_scale=guidance_scale,
                                          seed=seed, batch_size=batch_size, disc=disc)  # fmt: skip
        self.results: dict[str, Any] | None = None
        self.skipped: str | None = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # After every on_train_end: the export and the last checkpoint are written before the benchmark runs,
        # so an error here loses neither.
        if trainer.fast_dev_run or trainer.global_step == 0:
            return
        self.skipped = self.one_process_only(trainer, "held-out hands")
        if self.skipped is not None:
            return
        with self.timed():
            self.results = self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        import json

        from scail2.bench.synthetic_hands import format_hand_report, heldout_batches, load_hand_cases, sample_pairs, score_hands
        from scail2.utils.stats import json_safe
        from scail2.lora import adapters_disabled
        from scail2.models import load_transformer

        dm = trainer.datamodule
        for name in ("heldout_cache_dir", "root", "synth"):
            if getattr(dm, name, None) is None:
                raise ValueError(
                    f"callbacks.hands measures held-out synthetic preference pairs against their ground truth; the "
                    f"data module ({type(dm).__name__}) has no {name} (use data=synthetic_preference, or callbacks.hands=null)"
                )
        batches = [b.to(pl_module.device) for b in heldout_batches(dm.heldout_cache_dir, self.num_pairs, self.config.batch_size, self.config.seed)]
        ids = [i for b in batches for i in b.winner.meta["ids"]]
        cases = load_hand_cases(Path(dm.root) / "heldout" / "pairs" / "manifest.jsonl", dm.synth.seed, self.config.disc, ids)
        name = "sft" if pl_module.objective.dpo_weight == 0 else "dpo"
        net = pl_module.net
        samples = {}
        with model_in_eval(trainer, net):
            samples[name] = sample_pairs(net, batches, self.config)
            with adapters_disabled(net) as base:
                samples["base"] = sample_pairs(base, batches, self.config)
        for other, folder in self.compare.items():
            samples[other] = sample_pairs(load_transformer(folder).to(pl_module.device).eval(), batches, self.config)
        vae = None
        if self.pixels:
            from scail2.encoders.bundle import Encoders

            vae = Encoders.from_pretrained(self.encoders or dm.encoders_dir, device=pl_module.device).vae
        compare = [(name, other) for other in samples if other != name] + [(name, "dispreferred")]
        results = score_hands({k: {i: z.cpu() for i, z in v.items()} for k, v in samples.items()},
                              [b.to("cpu") for b in batches], cases, vae, compare, self.config)  # fmt: skip
        results["network"] = name
        results["step"] = trainer.global_step
        if trainer.global_rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / "results.json"
            path.write_text(json.dumps(json_safe(results), indent=1) + "\n")
            results["file"] = str(path)
            for line in format_hand_report(results):
                log.info(line)
            metrics = {f"hands/{m}/{n}": e["mean"] for m, t in results["metrics"].items() for n, e in t.items() if e["n"]}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": float(trainer.global_step), **{f"hands/{m}/{n}": e["mean"] for m, t in results["metrics"].items() for n, e in t.items()}})
        return results

    def summary_lines(self) -> list[str]:
        """The report for the end-of-run summary (empty before the run ends)."""
        if self.skipped is not None:
            return [f"Held-out preference pairs: hands {self.skipped}."]
        if self.results is None:
            return []
        from scail2.bench.synthetic_hands import format_hand_report

        lines = format_hand_report(self.results)
        if "file" in self.results:
            lines.append(f"  results         {self.results['file']}")
        return lines
