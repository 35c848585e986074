"""The LightningModule: a pre-training model plus LocalMIM's optimisation recipe."""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn

from lmim.callbacks.final_step import logs_this_batch
from lmim.errors import ConfigError, NonFiniteError
from lmim.seeding import MASK, derive_seed, rng_states, set_rng_states

log = logging.getLogger("lmim")


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters a module and its children exempt from weight decay."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            for n in sub.no_weight_decay():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups per part (encoder, decoders) x (decay, no decay).

    No decay on 1-D tensors (norms, biases), position embeddings and tokens (cls, mask). Frozen
    tensors (HOG filters, fixed position embeddings) are buffers and never reach the optimiser.
    """
    groups: list[dict[str, Any]] = []
    parts = {"encoder": net.encoder} if hasattr(net, "encoder") else {}
    rest = nn.ModuleDict({n: m for n, m in net.named_children() if n != "encoder"})
    parts["decoders"] = rest
    for part, module in parts.items():
        skip = no_decay_names(module)
        for g in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip):
            kind = "decay" if g["weight_decay"] else "no_decay"
            groups.append({**g, "name": f"{part}/{kind}"})
    return groups


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (FSDP2 DTensor) tensor; other tensors as they are."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


COMPILE_KEYS = ("mode", "backend", "fullgraph", "dynamic", "options")


def compile_options(cfg: dict | None) -> dict | None:
    """torch.compile's arguments from the ``compile`` config, None when it is off.

    Raises:
        ConfigError: an unknown key or mode.
    """
    if not cfg or not cfg.get("enabled", False):
        return None
    unknown = sorted(set(cfg) - {"enabled", *COMPILE_KEYS})
    if unknown:
        raise ConfigError(
            f"compile.{unknown[0]} is not a setting; use compile.enabled and torch.compile's "
            f"{', '.join(COMPILE_KEYS)}"
        )
    opts = {k: cfg[k] for k in COMPILE_KEYS if cfg.get(k) is not None}
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if opts.get("mode") not in (None, *modes):
        raise ConfigError(f"compile.mode={opts['mode']!r}: use one of {', '.join(modes)}")
    if opts.get("backend") not in (None, "inductor") and "mode" in opts:
        opts.pop("mode")  # modes are inductor's
    return opts


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> dict:
    """Lightning's optimizer config with timm's per-update schedule: linear warm-up from 0 over
    ``warmup_steps`` (capped below ``total_steps``), then a half cosine to ``min_lr``. Modules
    using it step it with ``scheduler.step_update(num_updates=self.global_step)``."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    sched = CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup, 1),
        lr_min=min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LocalMIMModule(L.LightningModule):
    """Pre-training loop around a :class:`lmim.models.LocalMIM` (or any model with the same
    ``forward(images, mask) -> output.loss / output.losses`` and ``random_mask`` contract).

    Masks do not depend on how a global batch is split across processes: every process draws
    the mask of the whole global batch, on its device, from a generator seeded by (seed,
    optimizer step, micro-batch) and keeps the rows of its own samples (rank, rank + world, ...: the
    ``DistributedSampler`` layout of :mod:`lmim.data.resumable`). The logged losses are those of
    the global batch (averaged over processes and accumulated micro-batches).

    A step whose loss or gradient is not finite (on any process) is skipped: the optimizer does
    not update (under fp16 the GradScaler also lowers its scale), ``train/nonfinite_steps``
    counts it, and ``max_nonfinite_in_a_row`` such steps in a row raise :class:`NonFiniteError`.

    Args:
        net: the pre-training model.
        optimizer: partial optimizer, finished here with parameter groups and the lr.
        blr: base learning rate; lr = blr x global batch / 256 with global batch =
            per-device batch x devices x nodes x accumulate_grad_batches.
        min_lr: end of the cosine schedule.
        warmup_epochs: linear warm-up from 0, in (fractional) epochs, stepped per optimizer step.
        warmup_steps: warm-up in optimizer steps; overrides ``warmup_epochs`` when set.
        config: the resolved run config, stored in checkpoints (``lmim_config``).
        seed: seed of the masks; None draws one per run (kept in checkpoints).
        max_nonfinite_in_a_row: skipped non-finite steps in a row that stop the run.
        compile: ``torch.compile`` of the training forward (the model's forward and backward
            on a drawn mask; parameter names and checkpoints unchanged, evaluation eager):
            ``enabled`` plus torch.compile's ``mode``, ``backend``, ``fullgraph``,
            ``dynamic``; None or ``enabled: false``: eager.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        blr: float = 1.5e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 40,
        warmup_steps: int | None = None,
        config: dict | None = None,
        seed: int | None = 0,
        max_nonfinite_in_a_row: int = 20,
        compile: dict | None = None,
    ) -> None:
        super().__init__()
        if int(max_nonfinite_in_a_row) < 1:
            raise ConfigError(
                f"optim.max_nonfinite_in_a_row={max_nonfinite_in_a_row} must be >= 1 (skipped "
                "non-finite steps in a row that stop the run), e.g. 20"
            )
        self.net = net
        self.optimizer_factory = optimizer
        self.blr = blr
        self.min_lr = min_lr
        self.warmup_epochs = warmup_epochs
        self.warmup_steps = warmup_steps
        self.config = config
        self.lr: float | None = None
        self.global_batch: int | None = None
        self.seed = seed
        self.max_nonfinite_in_a_row = int(max_nonfinite_in_a_row)
        self.compile_options = compile_options(compile)
        self._train_forward: Callable | None = None
        # Non-finite steps: [in all, in a row] on the host as of the last read, and the
        # device's counts (see _count_nonfinite).
        self._nonfinite_host = (0, 0)
        self._nonfinite_counts: torch.Tensor | None = None
        self._last_stats: torch.Tensor | None = None
        self._last_lr = 0.0
        # Sum over the micro-batches of this optimizer step of [loss, loss per tap...].
        self._step_losses: torch.Tensor | None = None
        self._micro_batches = 0
        self._tap_names: list[str] = []
        self._rng_to_restore: list[dict] | None = None
        self._mask_generators: dict[str, torch.Generator] = {}

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        taps: Sequence[int] | None = None,
    ):
        """The pre-training forward, or with ``taps`` the encoder's features of whole images.

        Evaluation callbacks call this through the strategy's wrapped model
        (``trainer.strategy.model``), so that DDP and FSDP see the forward (FSDP gathers its
        sharded parameters there).

        Args:
            images: (B, 3, H, W) normalised images.
            mask: (B, L) patch mask for the pre-training forward (None: drawn).
            taps: encoder layers, increasing: return their outputs, nothing masked.

        Returns:
            The model's output, or one (B, [1 +] N, D) tensor per tap.
        """
        if taps is not None:
            return self.net(images, features=taps)
        return self.net(images, mask)

    def configure_model(self) -> None:
        """Under :class:`lmim.fsdp.FSDP2Strategy` (``trainer=fsdp``): shard ``net``, every
        transformer block a unit plus the root. Lightning calls this on every process before
        building the optimizer, whose parameter groups then hold the shards."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lmim.fsdp import FSDP2Strategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            strategy.shard(self.net)
        elif isinstance(strategy, ModelParallelStrategy):
            raise ConfigError(
                f"trainer.strategy={type(strategy).__name__}: lmim shards its models with "
                "lmim.fsdp.FSDP2Strategy; use trainer=fsdp (or trainer=fsdp_cpu)"
            )
        if self.compile_options is not None and self._train_forward is None:
            # After sharding, so that the graphs see the sharded blocks (and FSDP's hooks, which
            # run in net's __call__). Only the training forward: evaluation and pictures call
            # the model with other arguments and stay eager.
            self._train_forward = torch.compile(self._masked_forward, **self.compile_options)

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def _run_seed(self) -> int:
        if self.seed is None:
            seed = secrets.randbits(62)
            trainer = self._trainer
            self.seed = int(trainer.strategy.broadcast(seed)) if trainer is not None else seed
        return int(self.seed)

    def setup(self, stage: str) -> None:
        self._run_seed()  # on every process, so a drawn seed is shared
        if getattr(self.net, "share_mask", False):
            self.mask_groups(1)  # a group size that cannot work stops before training

    def mask_groups(self, batch: int) -> int:
        """Masks drawn per micro-batch by a shared-mask model (``share_mask``): one per
        ``mask_group_size`` samples of the global batch (default: one per process batch).

        Counted on the DataModule's ``batch_size`` when there is one, so that a short last
        batch keeps the layout of the others.

        Args:
            batch: images in this process's batch.

        Raises:
            ConfigError: the global batch does not split into such groups.
        """
        world, _ = self._world()
        dm = self.trainer.datamodule if self._trainer is not None else None
        batch = int(getattr(dm, "batch_size", None) or batch)
        total = batch * world
        group = getattr(self.net, "mask_group_size", None) or batch
        if total % group:
            raise ConfigError(
                f"model.mask_group_size={group} does not divide the global batch of {total} "
                f"(data.batch_size={batch} x {world} process(es)): use a divisor, e.g. "
                f"model.mask_group_size={batch} (one mask per process batch)"
            )
        return total // group

    def step_mask(self, batch: int, batch_idx: int, device: torch.device) -> torch.Tensor:
        """This process's rows of the global batch's mask.

        Args:
            batch: images in this process's batch.
            batch_idx: the batch's index in the epoch (gives the micro-batch of accumulation).
            device: where to draw it (the images' device: no host work or copy per step; the
                draws, and so the masks, differ between device types).

        Returns:
            (batch, L) bool mask, True = masked: rows ``rank::world`` of the mask of the
            ``batch x world`` global batch drawn with seed (seed, step, micro-batch). With a
            shared-mask model that mask is :meth:`mask_groups` G masks, global row i taking mask
            ``i mod G``: with the ``DistributedSampler`` interleaving (rank r holds global rows
            r, r + world, ...) and the default group (a process batch), G = world and rank r's
            rows all take mask r, one mask per process as in the released code; one process
            with batch N x B and ``mask_group_size=B`` draws the same N masks for the same
            samples.
        """
        world, rank = self._world()
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        seed = derive_seed(self._run_seed(), MASK, self.global_step, batch_idx % accumulate)
        key = str(device)
        if key not in self._mask_generators:
            self._mask_generators[key] = torch.Generator(device=device)
        generator = self._mask_generators[key].manual_seed(seed)
        if getattr(self.net, "share_mask", False):
            groups = self.mask_groups(batch)
            full = self.net.random_mask(batch * world, device, generator, groups=groups)
        else:
            full = self.net.random_mask(batch * world, device=device, generator=generator)
        return full[rank::world]

    def _masked_forward(self, images: torch.Tensor, mask: torch.Tensor, **kwargs):
        """The training forward (what ``compile`` compiles): the model on a drawn mask."""
        return self.net(images, mask, from_random_mask=True, **kwargs)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        mask = self.step_mask(images.shape[0], batch_idx, images.device)
        kwargs = {}
        if getattr(self.net, "share_mask", False):
            # This process's rows take one mask when the G groups cycle within the world.
            kwargs["shared_rows"] = self._world()[0] % self.mask_groups(images.shape[0]) == 0
        forward = self._train_forward or self._masked_forward
        out = forward(images, mask, **kwargs)
        self._tap_names = list(out.losses)
        losses = torch.stack([out.loss.detach(), *(v.detach() for v in out.losses.values())])
        losses = losses.float()
        self._step_losses = losses if self._step_losses is None else self._step_losses + losses
        self._micro_batches += 1
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 1
        if (self.global_step + 1) % max(1, every) == 0:  # only where Lightning logs anyway
            target = getattr(self.net, "target", None)
            metrics = target.step_metrics(out.targets) if target is not None else {}
            for name, value in metrics.items():
                self.log(name, value)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Decide, on the device, whether this update is skipped (a loss or gradient not
        finite), and keep the global batch's losses for logging.

        Runs once per optimizer step after the (all-reduced, under fp16 possibly still scaled)
        gradients are ready. All processes agree through one small all-reduce. With a fused
        optimizer (the default ``optim.optimizer.fused=true``) the skip happens on the device
        too (:meth:`skip_mode`), so a step makes no host synchronisation: the losses reach the
        host on logging steps only (:meth:`on_train_batch_end`). Other optimizers decide on
        the host, one synchronisation per step.
        """
        if self._step_losses is None:  # no training_step of ours ran (e.g. manual calls)
            return
        world, _ = self._world()
        grads = [
            _local(p.grad)
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None
        ]
        losses = self._step_losses / self._micro_batches
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else losses.new_zeros(())
        self._step_losses, self._micro_batches = None, 0
        # Under FSDP each process holds its shard of the gradients: summing the flags over the
        # processes (below) tells whether any shard is not finite.
        flags = torch.stack([~torch.isfinite(losses[0]), ~torch.isfinite(grad_norm.float())])
        stats = torch.cat([losses, flags.to(losses)])
        if world > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        self._last_stats = stats
        self._last_lr = float(optimizer.param_groups[0]["lr"])
        bad = stats[-2:].sum() > 0
        self._count_nonfinite(bad)
        mode = self.skip_mode(optimizer)
        if mode == "host":  # one copy to the host: the flags and the counts
            read = torch.cat([stats[-2:].double(), self._nonfinite_counts.double()]).tolist()
            loss_bad, grads_bad = read[0] > 0, read[1] > 0
            if loss_bad or grads_bad:
                self._skip_update(optimizer)
            self._read_nonfinite(self.global_step, counts=read[2:])
        elif mode == "found_inf":
            # Fused Adam(W)/SGD skip the whole update (step counts too) when found_inf is 1;
            # optimizer_step removes it after the step.
            optimizer.found_inf = bad.float()
        else:  # "poison": a GradScaler that unscales inside a fused step checks for inf there
            first = next((g.view(-1)[:1] for g in grads if g.numel()), None)
            if first is not None:
                first.copy_(torch.where(bad, torch.full_like(first, float("nan")), first))

    def skip_mode(self, optimizer: torch.optim.Optimizer) -> str:
        """How a non-finite step is skipped: ``found_inf`` (a fused optimizer without a
        GradScaler: the optimizer's own skip flag, set on the device), ``poison`` (a fused
        optimizer under a GradScaler: one gradient entry set to NaN on the device, which the
        scaler's check inside the step sees) or ``host`` (any other optimizer: decided on the
        host, which waits for the step's gradients)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not fused:
            return "host"
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return "poison" if scaler is not None else "found_inf"

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            raw = getattr(optimizer, "optimizer", optimizer)  # inside a LightningOptimizer
            raw.__dict__.pop("found_inf", None)

    # -- non-finite steps: counted on the device, read on logging steps ---------------------

    def _count_nonfinite(self, bad: torch.Tensor) -> None:
        """[steps in all, current streak, longest streak since the last read], on the device."""
        c = self._nonfinite_counts
        if c is None or c.device != bad.device:
            # Filled on the device (a copy from the host would synchronise).
            c = torch.zeros(3, dtype=torch.int64, device=bad.device)
            total, streak = self._nonfinite_host
            if total or streak:
                c[0], c[1], c[2] = total, streak, streak
        b = bad.to(torch.int64)
        streak = (c[1] + 1) * b
        self._nonfinite_counts = torch.stack([c[0] + b, streak, torch.maximum(c[2], streak)])

    def _read_nonfinite(self, step: int | None = None, counts: list | None = None) -> None:
        """Bring the counts to the host (a synchronisation), warn about newly skipped steps and
        stop after ``max_nonfinite_in_a_row`` in a row.

        Args:
            step: the last step counted (default: the one just done, after the update).
            counts: the device counts already read (with the losses, in one copy).
        """
        c = self._nonfinite_counts
        if c is None:
            return
        total, streak, longest = (int(v) for v in (c.tolist() if counts is None else counts))
        before = self._nonfinite_host[0]
        self._nonfinite_host = (total, streak)
        self._nonfinite_counts = torch.stack([c[0], c[1], c[1]])
        step = self.global_step - 1 if step is None else step
        if total > before:
            log.warning(
                "%d non-finite step(s) up to step %d: update(s) skipped (%d in a row now, %d in "
                "all)",
                total - before,
                step,
                streak,
                total,
            )
        if longest >= self.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"{longest} optimizer steps in a row (up to step {step}) had a non-finite loss "
                f"or gradient, the limit optim.max_nonfinite_in_a_row="
                f"{self.max_nonfinite_in_a_row}; those steps did not update the weights. Try a "
                "lower optim.blr, trainer.gradient_clip_val=1.0, trainer.precision=bf16-mixed "
                "instead of 16-mixed, or check the data"
            )

    def _peek_nonfinite(self) -> tuple[int, int]:
        """(in all, in a row) now, read without the warning, the limit check or resetting the
        longest streak, which stay with the logging steps' reads (a synchronisation)."""
        c = self._nonfinite_counts
        if c is None:
            return self._nonfinite_host
        total, streak, _ = (int(v) for v in c.tolist())
        return total, streak

    @property
    def nonfinite_steps(self) -> int:
        """Skipped non-finite steps so far (reading it synchronises with the device)."""
        return self._peek_nonfinite()[0]

    @property
    def nonfinite_streak(self) -> int:
        """Non-finite steps in a row up to the last one (reading it synchronises)."""
        return self._peek_nonfinite()[1]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the step's losses, ``lr`` and non-finite count where Lightning writes this
        batch's metrics (every ``trainer.log_every_n_steps``, when stopping): the one host
        synchronisation of a logging step. Runs after every callback's ``on_train_batch_end``,
        so a stop they decide is seen."""
        stats, self._last_stats = self._last_stats, None
        if stats is None or not logs_this_batch(self.trainer, batch_idx):
            return
        world, _ = self._world()
        # One copy to the host for the losses and the non-finite counts (set with the stats).
        values = torch.cat([stats.double(), self._nonfinite_counts.double()]).tolist()
        *sums, _, _ = values[: stats.numel()]
        self._read_nonfinite(counts=values[stats.numel() :])
        # Host tensors: Lightning would turn Python floats into device tensors (one copy each).
        means = [torch.tensor(v / world, dtype=torch.float64) for v in sums]
        self.log("train/loss", means[0], prog_bar=True)
        for name, value in zip(self._tap_names, means[1:], strict=True):
            self.log(f"train/loss_{name}", value)
        self.log("lr", torch.tensor(self._last_lr, dtype=torch.float64), prog_bar=True)
        steps = float(self._nonfinite_host[0])
        self.log("train/nonfinite_steps", torch.tensor(steps, dtype=torch.float64))

    def _skip_update(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the coming ``optimizer.step()`` a no-op for the weights and the optimizer state
        (the ``host`` skip mode). Optimizers leave parameters without a gradient untouched
        (moments and step counts too); a GradScaler that already unscaled keeps its inf record
        and still backs off."""
        for p in _params(optimizer):
            p.grad = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            states, self._rng_to_restore = self._rng_to_restore, None
            world, rank = self._world()
            if len(states) == world:
                set_rng_states(states[rank], self.device)
            else:
                log.warning(
                    "the checkpoint holds RNG states of %d processes, this run has %d: "
                    "keeping the freshly seeded ones",
                    len(states),
                    world,
                )

    def global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        batch = getattr(dm, "batch_size", None)
        if batch is None:
            raise ConfigError("the DataModule must expose batch_size (images per device)")
        return int(batch) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        self.global_batch = self.global_batch_size()
        self.lr = self.blr * self.global_batch / 256
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accum = self.trainer.accumulate_grad_batches
        if not self.trainer.fast_dev_run and 0 < batches < accum and not math.isinf(batches):
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accum} is more than the {batches} batches of "
                f"an epoch on each of {self.trainer.world_size} process(es), so no update would "
                "see the intended global batch: lower trainer.accumulate_grad_batches (or "
                "data.batch_size, trainer.devices), or raise trainer.limit_train_batches"
            )
        if self.warmup_steps is not None:
            warmup = int(self.warmup_steps)
        else:
            per_epoch = 1 if math.isinf(batches) else max(1, math.ceil(batches / accum))
            warmup = int(round(self.warmup_epochs * per_epoch))
        opt = self.optimizer_factory(param_groups(self.net, self._weight_decay()), lr=self.lr)
        return warmup_cosine(opt, total, warmup, self.min_lr)

    def _weight_decay(self) -> float:
        wd = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay")
        return 0.05 if wd is None else float(wd)

    def lr_scheduler_step(self, scheduler, metric=None) -> None:
        # timm schedulers are stepped with the number of optimizer updates done so far.
        scheduler.step_update(num_updates=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint["lmim_config"] = self.config
        checkpoint["lmim_seed"] = self.seed
        steps, streak = self._peek_nonfinite()
        checkpoint["lmim_nonfinite"] = {"steps": steps, "streak": streak}
        # Every process's RNG states, by global rank (dropout / drop-path streams on resume).
        world, _ = self._world()
        states = rng_states(self.device)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        checkpoint["lmim_rng_states"] = gathered

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("lmim_seed") is not None:
            self.seed = int(checkpoint["lmim_seed"])
        counts = checkpoint.get("lmim_nonfinite", {})
        self._nonfinite_host = (int(counts.get("steps", 0)), int(counts.get("streak", 0)))
        self._nonfinite_counts = None
        # Applied before the first batch, after the data loader has started.
        self._rng_to_restore = checkpoint.get("lmim_rng_states")
