"""Fully sharded data parallel training: PyTorch FSDP2 (``fully_shard``) through Lightning's
``ModelParallelStrategy``.

``trainer=fsdp`` (GPUs, bf16) and ``trainer=fsdp_cpu`` (gloo processes on CPUs) use
:class:`FSDP2Strategy`. Every encoder and decoder block is a shard unit: its weights are
gathered just before its forward (and again for its backward) and freed after; the rest of the
pre-training model (patch embedding, tokens, tap norms, decoder embeddings and heads) is the
root unit. Gradients are reduce-scattered, so each process keeps and updates only its shard of
the weights and of the AdamW moments.

Checkpoints are folders (``last.ckpt/``) of per-process shards written by
``torch.distributed.checkpoint`` plus ``meta.pt`` (loops, data position, schedulers, lmim's
seeds and RNG states). They are written into a temporary folder next to the target and swapped
in whole (:func:`lmim.resume.replace_path`), like single-file checkpoints. A re-run resumes from
the folder (Lightning's loader), and ``python -m lmim.export`` reads it in one process.

Why not Lightning's ``FSDPStrategy``: it wraps with the older FSDP1 and refuses CPU accelerators
("The strategy fsdp requires a GPU accelerator"), so it could not be run, and so not tested, on
machines without GPUs; ``ModelParallelStrategy`` runs FSDP2 on CPU processes with gloo as on GPUs
with NCCL.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec.utils
import torch
from hydra.utils import get_class
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lmim.errors import ConfigError
from lmim.resume import fsync_tree, replace_path, temp_path_for

log = logging.getLogger("lmim")

# lmim's transformer blocks: the encoder's (ViT) and the decoders' timm Block, Swin's blocks.
DEFAULT_WRAP = (
    "timm.models.vision_transformer.Block",
    "lmim.models.swin.MaskedSwinBlock",
)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(key: str, value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ConfigError(
            f"trainer.strategy.{key}={value!r} is not a dtype: use one of {sorted(_DTYPES)} or null"
        )
    return _DTYPES[value]


def shard_units(net: nn.Module, wrap: Sequence[type]) -> list[nn.Module]:
    """The modules of ``net`` that become shard units, innermost first (FSDP wants children
    sharded before their parents)."""
    return [m for m in reversed(list(net.modules())) if isinstance(m, tuple(wrap)) and m is not net]


def shard_model(
    net: nn.Module,
    mesh: Any,
    wrap: Sequence[type],
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> list[nn.Module]:
    """Apply ``fully_shard`` to every module of a ``wrap`` class, then to ``net`` (the root).

    Args:
        net: the pre-training model (``LocalMIMModule.net``).
        mesh: 1-D device mesh of the data-parallel processes.
        wrap: module classes that each become a shard unit.
        param_dtype: dtype the blocks' weights are gathered and computed in, their inputs cast
            to it (the residual stream inside the blocks then runs in it too). None: the weights
            as stored (float32), so that under bf16 autocast the arithmetic is that of DDP (bf16
            matmuls, float32 residual stream and norms). The root's weights, the targets and the
            loss stay float32 in any case.
        reduce_dtype: dtype of the gradient reduce-scatter (None: the gradients' dtype).
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3); False
            keeps them until the backward (ZeRO-2: more memory, one all-gather less).

    Returns:
        The shard units other than the root.

    Raises:
        ConfigError: no module of ``net`` is of a ``wrap`` class.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(net, "batch_decoders", False):  # lmim.train refuses it before any process starts
        raise ConfigError(
            "model.batch_decoders=true cannot be sharded (FSDP shards each decoder block on its "
            "own): use model.batch_decoders=false"
        )
    units = shard_units(net, wrap)
    if not units:
        names = [f"{c.__module__}.{c.__qualname__}" for c in wrap]
        raise ConfigError(
            f"trainer.strategy.wrap={names} matches no module of the model "
            f"{type(net).__name__}: name its transformer block classes (e.g. "
            f"[{', '.join(DEFAULT_WRAP)}])"
        )
    blocks = MixedPrecisionPolicy(
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
        cast_forward_inputs=param_dtype is not None,
    )
    root = MixedPrecisionPolicy(reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    name = type(net).__name__  # fully_shard renames the class FSDP<name>
    for m in units:
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=blocks)
    fully_shard(net, mesh=mesh, mp_policy=root)
    # The root returns views (predictions, targets) that nothing changes in place; FSDP2 warns
    # about any view an FSDP module returns.
    warnings.filterwarnings(
        "ignore",
        message=rf"FSDP2-wrapped module \(FSDP{re.escape(name)}\) returned a view",
    )
    return units


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel replica per
    process (no tensor parallelism), lmim's blocks as shard units, atomic sharded checkpoints.

    The LightningModule shards its model in ``configure_model`` by calling :meth:`shard`
    (:class:`lmim.module.LocalMIMModule` does).

    Args:
        wrap: classes (dotted names) of the modules that each become a shard unit.
        param_dtype: dtype the blocks' weights are gathered and computed in, with their inputs
            (``bfloat16`` halves the all-gather traffic, but the residual stream inside the
            blocks is then bf16 too, unlike DDP's autocast); needs
            ``trainer.precision=bf16-mixed`` for the rest of the model. null: float32 weights,
            the arithmetic of DDP under the same precision.
        reduce_dtype: dtype of the gradient reduce-scatter (null: the gradients' dtype).
        reshard_after_forward: free gathered block weights after the forward (ZeRO-3).
        save_distributed_checkpoint: checkpoints as folders of shards (true), or one file
            assembled on rank 0 (false: needs the whole model and optimizer in its memory).
        process_group_backend: ``nccl`` on GPUs (the default), ``gloo`` on CPUs.
        timeout: of collectives.
    """

    def __init__(
        self,
        wrap: Sequence[str | type] = DEFAULT_WRAP,
        param_dtype: str | torch.dtype | None = None,
        reduce_dtype: str | torch.dtype | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.wrap = [get_class(c) if isinstance(c, str) else c for c in wrap]
        self.param_dtype = _dtype("param_dtype", param_dtype)
        self.reduce_dtype = _dtype("reduce_dtype", reduce_dtype)
        self.reshard_after_forward = bool(reshard_after_forward)

    def _configure_launcher(self) -> None:
        # Runs when the Trainer is built, before any process is launched: check settings here.
        precision = getattr(self.precision_plugin, "precision", None)
        if self.param_dtype not in (None, torch.float32) and precision != "bf16-mixed":
            name = str(self.param_dtype).removeprefix("torch.")
            raise ConfigError(
                f"trainer.strategy.param_dtype={name} needs "
                f"trainer.precision=bf16-mixed (got {precision}): autocast runs the layers "
                "outside the blocks on their low-precision outputs; set "
                "trainer.strategy.param_dtype=null for float32 training"
            )
        super()._configure_launcher()

    def setup_environment(self) -> None:
        # Every process is one data-parallel replica (Lightning's "auto" would make the
        # processes of each node a tensor-parallel group).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, net: nn.Module) -> list[nn.Module]:
        """Shard ``net`` over the data-parallel processes (once; later calls do nothing).

        Returns:
            The shard units other than the root (empty if ``net`` was already sharded).
        """
        from torch.distributed.fsdp import FSDPModule

        if isinstance(net, FSDPModule):
            return []
        units = shard_model(
            net,
            self.device_mesh["data_parallel"],
            self.wrap,
            param_dtype=self.param_dtype,
            reduce_dtype=self.reduce_dtype,
            reshard_after_forward=self.reshard_after_forward,
        )
        if self.global_rank == 0:
            log.info(
                "FSDP: %d shard units + the root over %d processes", len(units), self.world_size
            )
        return units

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        """Write the shards into a temporary folder next to ``filepath``, then swap it in.

        A process killed while saving leaves the previous checkpoint whole (and a temporary
        folder that :func:`lmim.resume.remove_stale_temp_files` removes at the next start).
        """
        local = fsspec.utils.get_protocol(str(filepath)) == "file"
        if not self._save_distributed_checkpoint or storage_options is not None or not local:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(temp_path_for(path))))  # rank 0's name, on every rank
        try:
            super().save_checkpoint(checkpoint, tmp)  # every rank its shard, rank 0 meta.pt
            if self.global_rank == 0:
                fsync_tree(tmp)
                replace_path(tmp, path)
        except BaseException:
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
