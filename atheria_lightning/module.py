"""QCAModule: one training step is one episode of Atheria's QCA rollout, back-propagated end to end."""

from __future__ import annotations

import gc
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from typing_extensions import override

from atheria_lightning.accel import fast_stepper, weight_cast_cache
from atheria_lightning.loggers.scalars import logging_step, send_to_loggers
from atheria_lightning.physics import (
    combined_metric,
    compute_loss,
    episode_generator,
    initial_state,
    lindblad_step,
    noise_level,
    psi_magnitude,
    rollout,
)
from atheria_lightning.settings import ModelSettings, apply_changed_optimizer_settings, flat_settings

log = logging.getLogger(__name__)

#: What each validation logs, as ``val/<name>``: the mean over the fixed validation universes. ``loss`` is the
#: training objective (the presets' checkpoint monitor); ``combined`` is the original notebook's score.
VALIDATION_SCORES = ("loss", "combined", "survival", "symmetry", "complexity")


class EpisodeOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """An episode ran out of accelerator memory twice, the second time after the cache was emptied."""

    def __init__(self, episode: int, settings: str) -> None:
        super().__init__(
            f"out of GPU memory at episode {episode} ({settings}), also after freeing the cache; the last finished "
            "episode is saved. Try a smaller --model.universes_per_episode, --model.checkpoint_every 2, a smaller "
            "--model.hidden_channels or --model.grid_size, or --trainer.precision bf16-mixed, then run again"
        )
        self.episode = episode


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive episodes gave a NaN or infinite loss: training cannot make progress."""


class QCAModule(pl.LightningModule):
    """Trains a Law M operator by rolling random universes forward and scoring the final state.

    Its settings are those of :mod:`atheria_lightning.settings`, by keyword (``QCAModule(architecture="MLP",
    d_state=2)``; on the command line ``--model.architecture MLP``): :func:`~atheria_lightning.settings.flat_settings`
    lists them, with their defaults and help.

    Logs ``train/loss``, ``train/survival``, ``train/symmetry``, ``train/complexity``, ``train/noise_level``,
    ``train/nonfinite_skipped`` every episode, at the trainer's ``log_every_n_steps`` cadence, straight to the
    loggers and into ``trainer.callback_metrics``, where the plateau scheduler and the callbacks read them (without
    ``self.log``'s cost per key: :func:`~atheria_lightning.loggers.send_to_loggers`). Under DDP the
    loss and its parts are means over the ranks, so every rank skips or steps, and lowers the learning rate, at the
    same episodes. Also logs, at each validation, ``val/loss`` (the training objective on the fixed validation
    universes: what the presets rank checkpoints by), ``val/combined`` (the original's score, 10 survival + 5
    symmetry; survival is held near 0.2 by the per-cell renormalisation, so it hardly moves), ``val/survival``,
    ``val/symmetry``, ``val/complexity``.
    """

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        # Every setting, the defaults filled in, under the name save_hyperparameters() reads from this frame: the
        # checkpoint keeps them all, flat, so it alone rebuilds the model (each is a plain number or string, which
        # loads with weights_only=True). LightningCLI follows **settings to flat_settings for the --model.* keys.
        # Lightning's own entries (``_class_path``, ``_instantiator``: LightningCLI's) come back from a checkpoint's
        # hyper-parameters as keywords: not settings. (Removed in place: jsonargparse reads the call below as it is
        # written, `flat_settings(**settings)`, to find the --model.* keys.)
        for name in [name for name in settings if name.startswith("_")]:
            del settings[name]
        settings = flat_settings(**settings)
        self.save_hyperparameters()
        # The groups check them (one line naming the flag for a bad value).
        self.settings = ModelSettings.from_flat(settings)
        operator = self.settings.operator
        self.operator = operator.operator_class(operator.d_state, operator.hidden_channels)
        self.loss_weights = self.settings.loss.weights
        self.nonfinite_skipped = 0
        self._consecutive_nonfinite = 0
        self._drop_next_step = False
        self._validation_scores: list[torch.Tensor] = []
        self._snapshot: torch.Tensor | None = None
        self._picture: tuple[int, torch.Tensor] | None = None  # the first validation universe, for TensorBoard
        self._initial_picture_logged = False
        # What the rollout calls, per device: the operator itself, or it behind torch.compile (built at the first
        # episode, once the device is known). Not a submodule, so parameters and checkpoints are the plain operator's.
        self._rollout_operators: dict[torch.device, Any] = {}

    @override
    def setup(self, stage: str) -> None:
        # Before the strategy moves the module and wraps it (DDP), so gradient buckets get the final layout.
        self._use_channels_last(self.trainer.strategy.root_device)

    def _use_channels_last(self, device: torch.device) -> None:
        if self.settings.speed.channels_last and device.type == "cuda":
            self.operator.to(memory_format=torch.channels_last)

    def rollout_operator(self) -> Any:
        """The callable the rollout steps with: the operator, compiled as ``compile`` asks where possible."""
        if self.device not in self._rollout_operators:
            self._use_channels_last(self.device)  # a no-op after setup(); here for loops without a Trainer
            speed = self.settings.speed
            compiled = fast_stepper(self.operator, speed.compile, self.device, speed.checkpoint_every,
                                    speed.compile_scope)  # fmt: skip
            self._rollout_operators[self.device] = compiled
        return self._rollout_operators[self.device]

    @override
    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        """One Lindblad-Euler step of ``psi`` (complex ``(B, H, W, d)``), without noise or memory."""
        return lindblad_step(self.operator, psi, self.settings.rollout.gamma_decay)[0]

    def run_episode(self, seed: int, episode: int, noise: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Roll out the universes of ``episode`` (a pure function of ``seed``, ``episode`` and the rank)."""
        universe = self.settings.rollout
        psi0, generator = self.initial_universes(seed, episode)
        with weight_cast_cache(self.device.type):  # Lightning's mixed precision leaves autocast's weight cache off
            result = rollout(self.rollout_operator(), psi0, universe.qca_steps, universe.gamma_decay, noise, generator)
        return compute_loss(self.settings.loss.loss, result.final, psi0, self.loss_weights), result.final

    def initial_universes(self, seed: int, episode: int) -> tuple[torch.Tensor, torch.Generator]:
        """The universes ``episode`` starts from, and the generator that then draws its noise."""
        universe, d_state = self.settings.rollout, self.settings.operator.d_state
        generator = episode_generator(seed, episode, self.device, rank=self.global_rank)
        psi0 = initial_state(
            universe.initial_state, universe.universes_per_episode, universe.grid_size, d_state, generator, self.device
        )
        return psi0, generator

    def noise_at(self, episode: int) -> float:
        """The curriculum's noise level at ``episode``."""
        return noise_level(episode, self.settings.noise.max_noise, self.settings.noise.noise_ramp_episodes)

    @override
    def training_step(self, batch: dict[str, int], batch_idx: int) -> torch.Tensor | None:
        episode = batch["episode"]
        noise = self.noise_at(episode)
        parts, final = self._run_episode_retrying_oom(batch["seed"], episode, noise)
        self._snapshot = final[0].detach().clone()  # a copy: the next episode may replay over a CUDA graph's output
        # Under DDP each rank rolls out its own universes. The logged values are their means over the ranks (one
        # collective per episode; nothing on one device), so every rank takes the same decisions: skip or step
        # (a rank skipping alone would leave the others waiting in the gradient all-reduce), and the same
        # learning-rate reductions (ReduceLROnPlateau steps on train/loss; per-rank losses drift the replicas apart).
        scores = {key: value.detach() for key, value in parts.items()}
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:
            means = self.trainer.strategy.reduce(torch.stack(list(scores.values())), reduce_op="mean")
            scores = dict(zip(scores, means.unbind(), strict=True))
        loss = scores.pop("loss")
        # One host sync per episode (not per step): the optimizer must not see a NaN.
        if not torch.isfinite(loss):
            self._skip_nonfinite(episode, loss, noise)
            if not distributed:
                return None  # Lightning skips the backward pass and the step
            # Lightning refuses None under DDP: every rank runs the backward pass (its all-reduce included) and
            # optimizer_step drops the step on every rank.
            self._drop_next_step = True
            return parts["loss"]
        self._consecutive_nonfinite = 0
        self._log_scalars({"train/loss": loss, "train/noise_level": noise,
                           "train/nonfinite_skipped": float(self.nonfinite_skipped), **self._learning_rate(),
                           **{f"train/{key}": value for key, value in scores.items()}})  # fmt: skip
        return parts["loss"]

    def _learning_rate(self) -> dict[str, float]:
        """``train/lr``: the plateau scheduler lowers it; a host number, read without a device sync."""
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        return {"train/lr": float(optimizers[0].param_groups[0]["lr"])} if optimizers else {}

    def _log_scalars(self, metrics: dict[str, Any]) -> None:
        """The episode's ``train/*`` values: to the loggers at the trainer's cadence, as ``self.log`` would send
        them, without its cost per key (see :func:`~atheria_lightning.loggers.send_to_loggers`)."""
        if self._trainer is not None:
            send_to_loggers(self.trainer, metrics, cadence=True)

    def _run_episode_retrying_oom(
        self, seed: int, episode: int, noise: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One retry after an out-of-memory error (fragmentation often frees enough), then a clear error."""
        try:
            return self.run_episode(seed, episode, noise)
        except torch.cuda.OutOfMemoryError:
            log.warning("episode %d ran out of GPU memory: emptying the cache and trying once more", episode)
        gc.collect()  # only on this rare path: drops the failed attempt's tensors before the retry
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            return self.run_episode(seed, episode, noise)
        except torch.cuda.OutOfMemoryError:
            universe = self.settings.rollout
            settings = (
                f"grid {universe.grid_size}, {universe.universes_per_episode} universes, hidden "
                f"{self.settings.operator.hidden_channels}, {universe.qca_steps} steps, precision "
                f"{self.trainer.precision if self._trainer else 'n/a'}"
            )
            raise EpisodeOutOfMemoryError(episode, settings) from None

    def _skip_nonfinite(self, episode: int, loss: torch.Tensor, noise: float) -> None:
        self.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        # No loss for this episode: the plateau scheduler (strict=False) and the callbacks must not read the last one.
        self.trainer.callback_metrics.pop("train/loss", None)
        self._log_scalars({"train/noise_level": noise, "train/nonfinite_skipped": float(self.nonfinite_skipped)})
        log.warning("episode %d: loss is %s, optimizer step skipped", episode, loss.item())
        if self._consecutive_nonfinite >= self.settings.rollout.max_nonfinite_episodes:
            raise NonFiniteTrainingError(
                f"{self._consecutive_nonfinite} consecutive episodes had a non-finite loss (last: episode {episode}); "
                "lower model.lr or model.gamma_decay, or train with trainer.precision=32-true"
            )
        return None

    @override
    def validation_step(self, batch: dict[str, int], batch_idx: int) -> None:
        # The initial state and noise of a validation universe depend on its seed alone; only the level follows
        # the curriculum, so successive validations score the same universes under the current conditions.
        # Lightning validates under no_grad during fit; inference mode skips the autograd bookkeeping as well (the
        # rollout is the whole cost). The scores are cloned out of it, and logged once per validation.
        with torch.inference_mode():
            parts, final = self.run_episode(batch["seed"], 0, self.noise_at(batch["episode"]))
            if batch_idx == 0 and self._tensorboards():
                self._picture = (batch["seed"], psi_magnitude(final).float().cpu())
            parts["combined"] = combined_metric(parts)
            scores = torch.stack([parts[key].reshape(()) for key in VALIDATION_SCORES])
        self._validation_scores.append(scores.clone())

    @override
    def on_validation_epoch_start(self) -> None:
        self._validation_scores = []
        self._picture = None

    def _tensorboards(self) -> list[Any]:
        """The TensorBoard writers of rank 0's loggers (pictures go there only)."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return []
        return [logger.experiment for logger in self.trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _log_pictures(self) -> None:
        """``universe/final``: ``sum_d |psi|`` of the first validation universe after its rollout, at each validation;
        ``universe/initial``: the same universe before it, once per run. The thing a user would rather look at."""
        if self._picture is None:
            return
        seed, final = self._picture
        self._picture = None
        step = logging_step(self.trainer)
        pictures = {"universe/final": final}
        if not self._initial_picture_logged and self.trainer.ckpt_path is None:
            pictures["universe/initial"] = psi_magnitude(self.initial_universes(seed, 0)[0]).float().cpu()
        self._initial_picture_logged = True
        for writer in self._tensorboards():
            for tag, picture in pictures.items():
                writer.add_image(tag, _as_image(picture), step, dataformats="CHW")

    @override
    def on_validation_epoch_end(self) -> None:
        # One self.log per score and validation (each call has a cost per key), not per score and step:
        # every step rolls out the same number of universes, so the mean of the steps is the mean of the universes.
        if not self._validation_scores:
            return
        means = torch.stack(self._validation_scores).mean(dim=0)
        self._validation_scores = []
        metrics = {f"val/{key}": value for key, value in zip(VALIDATION_SCORES, means.unbind(), strict=True)}
        self.log_dict(metrics, sync_dist=True)
        self._log_pictures()

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if optimizer_closure is None or self.trainer.world_size == 1:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
            return
        # Under DDP the closure (training_step and the backward pass) runs first, so that a non-finite episode can
        # drop the step it belongs to on every rank; the step then reuses its result (clipping and hooks as usual).
        loss = optimizer_closure()
        if self._drop_next_step:
            self._drop_next_step = False
            return
        optimizer.step(closure=lambda: loss)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.operator.parameters() if p.requires_grad]
        settings = self.settings.optimizer
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience
        )
        # Stepped once per episode on the logged training loss; "strict": False because a skipped
        # non-finite episode logs no loss.
        plateau = {"scheduler": scheduler, "monitor": "train/loss", "interval": "step", "frequency": 1, "strict": False}
        return {"optimizer": optimizer, "lr_scheduler": plateau}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        if self._snapshot is not None:
            # One final state of the latest episode, as real (H, W, d, 2), for pictures without rerunning.
            checkpoint["final_state"] = torch.view_as_real(self._snapshot.cpu().resolve_conj().contiguous())

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))
        apply_changed_optimizer_settings(checkpoint, self.settings.optimizer)
        if "final_state" in checkpoint:
            self._snapshot = torch.view_as_complex(checkpoint["final_state"].contiguous())


#: Pictures are scaled up to at least this many pixels a side: TensorBoard shows an image at its own size.
PICTURE_PIXELS = 128


def _as_image(magnitude: torch.Tensor) -> torch.Tensor:
    """An (H, W) map of ``sum_d |psi|`` as a (1, H', W') grey image in [0, 1], scaled by its own maximum."""
    scale = max(1, PICTURE_PIXELS // max(magnitude.shape))
    image = magnitude / magnitude.max().clamp_min(torch.finfo(magnitude.dtype).tiny)
    return image.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1).unsqueeze(0)
