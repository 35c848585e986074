"""Small helpers used by the entry points: config location, loggers, W&B mode."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmim.errors import ConfigError
from lmim.rendezvous import on_rank_zero, run_id

log = logging.getLogger("lmim")


def _budget_label(max_epochs: int | None, max_steps: int | None, fast_dev_run: Any = False) -> str:
    """What bounds the run: ``100ep``, ``5000steps`` when a step limit is set, ``fast_dev_run``.

    Lightning stops at whichever of ``max_epochs`` and ``max_steps`` comes first; a step limit
    (``max_steps > 0``) is what a user sets to shorten a run whose epochs default to the paper's
    (``trainer.max_steps=10`` on top of 1600 epochs), so it names the run.
    """
    if fast_dev_run:
        return "fast_dev_run"
    if max_steps is not None and int(max_steps) > 0:
        return f"{int(max_steps)}steps"
    if max_epochs is None or int(max_epochs) < 0:
        return "unbounded"
    return f"{int(max_epochs)}ep"


def local_devices(devices: Any) -> int:
    """Processes per node for a ``trainer.devices`` value (``-1``/``auto``: every GPU, or one
    process on a machine without GPUs)."""
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, list | tuple | ListConfig):
        return max(len(devices), 1)
    from lightning.fabric.accelerators.cuda import num_cuda_devices

    return max(num_cuda_devices(), 1)


def _num_workers(cap: int, devices: Any = 1) -> int:
    """``min(cap, Lightning's suggested maximum)``: the CPUs this process may use
    (``os.sched_getaffinity``) divided by the devices of the node, less one for the main
    process, at least 1. A 2-core machine gets 1 worker instead of a warning about 8."""
    from lightning.fabric.utilities.data import suggested_max_num_workers

    return max(0, min(int(cap), suggested_max_num_workers(local_devices(devices))))


def _option_value(group: str, option: str, key: str) -> Any:
    """``key`` of ``conf/<group>/<option>.yaml``, following the option's defaults list within
    the group (``trainer/cpu.yaml`` -> ``trainer/default.yaml``); None when not found."""
    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    if key in node:
        return node[key]
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            value = _option_value(group, entry, key)
            if value is not None:
                return value
    return None


def _experiment_devices(devices: Any) -> Any:
    """An experiment's ``trainer.devices`` (the paper's GPU count), unless the command line
    chose the trainer group: then that trainer option's own devices, so that
    ``experiment=vit_b_100ep trainer=cpu`` runs on one CPU process."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return devices
    hydra_cfg = HydraConfig.get()
    chosen = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") == "trainer"]
    if not chosen:
        return devices
    own = _option_value("trainer", hydra_cfg.runtime.choices.get("trainer", ""), "devices")
    return devices if own is None else own


# conf/train.yaml's labels.budget, the data configs' num_workers, the experiments' devices.
OmegaConf.register_new_resolver("lmim.budget", _budget_label, replace=True)
# Used by conf/hydra/default.yaml: the run folder's name, one for all processes (cached per
# config, so a sweep's jobs share their master's), and .hydra written by rank 0 only.
OmegaConf.register_new_resolver("lmim.run_id", run_id, use_cache=True, replace=True)
OmegaConf.register_new_resolver("lmim.on_rank_zero", on_rank_zero, replace=True)
OmegaConf.register_new_resolver("lmim.num_workers", _num_workers, replace=True)
OmegaConf.register_new_resolver("lmim.experiment_devices", _experiment_devices, replace=True)


def config_dir() -> Path:
    """The Hydra config folder: ``conf/`` of a checkout, or ``lmim/conf`` inside a wheel."""
    here = Path(__file__).resolve().parent
    # A wheel ships the configs as lmim/conf; an editable install of a checkout reads conf/.
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"lmim's Hydra configs are missing: looked for {here.parents[1] / 'conf'} and "
        f"{here / 'conf'}; reinstall lmim"
    )


def instantiate_checked(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets lmim's ConfigError through unwrapped, so the user
    sees the one-line message naming the key instead of Hydra's instantiation traceback.

    A key the class does not take (``+data.batchsize=4`` adds one) becomes a ConfigError that
    names it and the closest setting the node has (``data.batch_size``).
    """
    from omegaconf.errors import MissingMandatoryValue

    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as err:
        raise _unset(err) from None
    except InstantiationException as err:
        cause: BaseException | None = err
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            if isinstance(cause, MissingMandatoryValue):
                raise _unset(cause) from None
            if isinstance(cause, TypeError):
                unknown = _unknown_setting(node, err, cause)
                if unknown is not None:
                    raise unknown from None
            cause = cause.__cause__
        raise


def _unset(err: Exception) -> ConfigError:
    """A ``???`` value the run needs, named as the command line sets it (``model.target`` is
    the ``target`` group)."""
    key = str(getattr(err, "full_key", "") or "")
    if key.startswith("model.target."):
        key = key[len("model.") :]
    if not key:
        return ConfigError(f"a required setting is not set ({err})")
    value = "<the dotted name of your function or class>" if key.endswith("_target_") else "<value>"
    return ConfigError(f"{key} is not set: pass {key}={value}")


def _unknown_setting(node: DictConfig, err: Exception, cause: TypeError) -> ConfigError | None:
    import difflib
    import re

    match = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if match is None:
        return None
    name = match.group(1)
    where = re.search(r"full_key: (\S+)", str(err))
    path = where.group(1) if where else node._get_full_key(None)
    target = re.search(r"target '([^']+)'", str(err))
    own = node._get_full_key(None) or ""
    relative = path[len(own) :].lstrip(".") if path.startswith(own) else ""
    sub = OmegaConf.select(node, relative) if relative else node
    scope = sub if isinstance(sub, DictConfig) else node
    valid = [str(k) for k in scope if str(k) != name and not str(k).startswith("_")]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean {path}.{close[0]}?" if close else f"its settings: {', '.join(valid)}"
    return ConfigError(
        f"{path}.{name} is not a setting of {target.group(1) if target else path} (added with "
        f"+{path}.{name}=...): {hint}"
    )


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(value: str | None) -> None:
    """``torch.set_float32_matmul_precision`` from the ``matmul_precision`` config key.

    Args:
        value: ``highest`` (float32 matmuls in float32), ``high`` (TF32 tensor cores on NVIDIA
            GPUs from Ampere on, or bf16x3), ``medium`` (bf16); None leaves torch's setting.

    Raises:
        ConfigError: another value.
    """
    if value is None:
        return
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"matmul_precision={value}: use one of {', '.join(MATMUL_PRECISIONS)}, or null "
            "(torch's own setting)"
        )
    import torch

    torch.set_float32_matmul_precision(value)


def wandb_has_key() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


# In the run folder: the id of its W&B run, which a resumed run continues.
WANDB_ID_FILE = "wandb_run_id"


def _wandb_node(cfg: DictConfig | None) -> DictConfig | None:
    for node in (cfg or {}).values():
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("WandbLogger"):
            return node
    return None


def wandb_run_id(cfg: DictConfig | None, output_dir: str | Path, resuming: bool) -> str | None:
    """The W&B run a run logs to (called on global rank 0): the one recorded in
    ``<output_dir>/wandb_run_id`` when resuming from that folder, else a new id, recorded there.

    Args:
        cfg: the ``logger`` group.
        output_dir: the run folder.
        resuming: the run continues the folder's ``last.ckpt``.

    Returns:
        The id, or None without a W&B logger or when the config names the run
        (``logger.wandb.id`` / ``version``: that wins).
    """
    node = _wandb_node(cfg)
    if node is None or node.get("id") or node.get("version"):
        return None
    path = Path(output_dir) / WANDB_ID_FILE
    if resuming and path.is_file():
        recorded = path.read_text().strip()
        if recorded:
            return recorded
    # W&B's own id alphabet and length.
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new_id + "\n")
    tmp.replace(path)
    return new_id


def build_loggers(cfg: DictConfig | None, wandb_id: str | None = None) -> list:
    """Instantiate the ``logger`` group; W&B goes offline (one line says so) without an API key.

    Args:
        cfg: the ``logger`` group.
        wandb_id: the W&B run to log to (resumed when it exists), from :func:`wandb_run_id`.
    """
    if not cfg:
        return []
    loggers = []
    for name, node in cfg.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        kwargs: dict[str, Any] = {}
        if node._target_.endswith("WandbLogger"):
            if wandb_id:
                kwargs["id"] = wandb_id  # WandbLogger resumes it ("allow")
            mode = os.environ.get("WANDB_MODE", "").lower()
            if mode in ("offline", "disabled", "dryrun") or not wandb_has_key():
                kwargs["offline"] = True
                from lightning.pytorch.utilities import rank_zero_only

                if mode != "disabled" and rank_zero_only.rank == 0:
                    log.warning(
                        "W&B: no API key found, logging offline to %s/wandb; upload later with "
                        "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first)",
                        node.save_dir,
                        node.save_dir,
                    )
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate_checked(node, **kwargs))
        log.info("logger %s: %s", name, node._target_)
    return loggers


def build_callbacks(cfg: DictConfig | None) -> list:
    """Instantiate every node of the ``callbacks`` group that has a ``_target_``."""
    if not cfg:
        return []
    return [
        instantiate_checked(node)
        for node in cfg.values()
        if isinstance(node, DictConfig) and "_target_" in node
    ]


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run if one is open (always called, also when training fails)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def weights_digest(module: object) -> str | None:
    """SHA-256 of a module's state dict (None for a plain function)."""
    import hashlib

    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
