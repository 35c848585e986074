"""One answer for every process of a run, decided on global rank 0 before the process group.

Under ``srun``, ``torchrun`` or processes started by hand (``MASTER_ADDR``, ``MASTER_PORT``,
``NODE_RANK``, ``LOCAL_RANK``), every process composes the config and starts on its own, seconds
apart. What must be the same on all of them before Lightning joins them in a process group (the
run folder's name, whether to resume and from where, the W&B run) is decided once, on global
rank 0, and read by the others from a :class:`torch.distributed.TCPStore` at
``MASTER_ADDR:MASTER_PORT``. Rank 0 hosts that store as a multi-tenant server, so the process
group Lightning creates later on the same port reuses it; under torchrun the agent's store there
is used.

The run folder is named by the ``lmim.run_id`` resolver (``conf/hydra/default.yaml``):

* ``run_id=NAME`` when given;
* ``slurm-<SLURM_JOB_ID>`` (array tasks: ``slurm-<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>``)
  under Slurm, so a requeued job finds its folder again;
* torchrun's ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``) when one is given;
* else rank 0's start time, ``YYYY-MM-DD_HH-MM-SS``, shared with the other processes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from lmim.errors import ConfigError

if TYPE_CHECKING:  # torch is imported when a store is needed, not with the configs
    from torch.distributed import TCPStore

# How long a process waits for rank 0 (to start, or to decide): torch's process-group default.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Endpoint:
    """Where the processes of one run meet.

    Attributes:
        host: ``MASTER_ADDR``.
        port: ``MASTER_PORT``.
        rank_zero: this process is global rank 0, which decides.
        agent_store: torchrun's agent hosts the store there; every process is a client.
    """

    host: str
    port: int
    rank_zero: bool
    agent_store: bool = False


def _slurm_launched() -> bool:
    # Lightning's test for a Slurm-managed process (SLURMEnvironment.detect): interactive
    # allocations (job name bash / interactive) are not.
    env = os.environ
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _agent_store() -> bool:
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def launched_endpoint() -> Endpoint | None:
    """The endpoint of a process started by a launcher, from its environment, in Lightning's
    order (Slurm, torchrun, then ``LOCAL_RANK`` set by hand); None for a plain process (which
    may still start its own workers later)."""
    env = os.environ
    if _slurm_launched():
        if int(env.get("SLURM_NTASKS", "1")) < 2:
            return None
        from lightning.fabric.plugins.environments import SLURMEnvironment

        slurm = SLURMEnvironment()
        return Endpoint(slurm.main_address, slurm.main_port, int(env.get("SLURM_PROCID", 0)) == 0)
    if "TORCHELASTIC_RUN_ID" in env and "MASTER_PORT" in env:
        rank0 = int(env.get("RANK", 0)) == 0
        return Endpoint(env["MASTER_ADDR"], int(env["MASTER_PORT"]), rank0, _agent_store())
    if "LOCAL_RANK" in env and "MASTER_PORT" in env:
        if "RANK" in env:
            rank0 = int(env["RANK"]) == 0
        else:
            node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
            rank0 = node == 0 and int(env["LOCAL_RANK"]) == 0
        return Endpoint(env.get("MASTER_ADDR", "127.0.0.1"), int(env["MASTER_PORT"]), rank0)
    return None


def trainer_endpoint(trainer: Any) -> Endpoint | None:
    """The endpoint of a Trainer's processes (None for one process): its cluster environment's
    address and port, also when Lightning itself starts the other processes later."""
    if trainer.world_size < 2:
        return None
    cluster = getattr(trainer.strategy, "cluster_environment", None)
    if cluster is None:
        return None
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    agent = isinstance(cluster, TorchElasticEnvironment) and _agent_store()
    return Endpoint(cluster.main_address, cluster.main_port, trainer.is_global_zero, agent)


def is_rank_zero() -> bool:
    """This process is (or will be) global rank 0, judged from the environment alone."""
    endpoint = launched_endpoint()
    return endpoint is None or endpoint.rank_zero


# Rank 0's servers stay up for the life of the process: the process group reuses them.
_SERVERS: dict[int, TCPStore] = {}
_CALLS: Counter[str] = Counter()


def _store(endpoint: Endpoint) -> TCPStore:
    from torch.distributed import TCPStore

    if endpoint.rank_zero and not endpoint.agent_store:
        if endpoint.port not in _SERVERS:
            _SERVERS[endpoint.port] = TCPStore(
                endpoint.host,
                endpoint.port,
                None,
                True,
                TIMEOUT,
                wait_for_workers=False,
                multi_tenant=True,
            )
        return _SERVERS[endpoint.port]
    return TCPStore(endpoint.host, endpoint.port, None, False, TIMEOUT, wait_for_workers=False)


def share(
    name: str, decide: Callable[[], Any], endpoint: Endpoint | None, per_attempt: bool = True
) -> Any:
    """``decide()`` on global rank 0; its value on every process.

    Every process must call this with the same ``name`` the same number of times, in the same
    order (the n-th call of a name on each process gets the n-th decision). A
    :class:`ConfigError` (or any failure) of ``decide`` on rank 0 is raised on every process.

    Args:
        name: what is decided (part of the store key).
        decide: computes the value (JSON-serialisable) on rank 0.
        endpoint: where the processes meet; None runs ``decide`` here.
        per_attempt: a new decision after a torchrun restart; False keeps a decision still in
            torchrun's store from an earlier attempt (the run folder).
    """
    if endpoint is None:
        return decide()
    _CALLS[name] += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if per_attempt else "any"
    key = f"lmim/{name}/{attempt}/{_CALLS[name]}"
    store = _store(endpoint)
    if endpoint.rank_zero:
        try:
            answer = {"value": decide()}
        except ConfigError as err:
            store.set(key, json.dumps({"error": str(err)}))
            raise
        except BaseException as err:
            store.set(key, json.dumps({"failed": f"{type(err).__name__}: {err}"}))
            raise
        # compare_set: a decision already in the store (an earlier torchrun attempt) stands.
        answer = json.loads(store.compare_set(key, "", json.dumps(answer)))
    else:
        answer = json.loads(store.get(key))
    if "error" in answer:
        raise ConfigError(answer["error"])
    if "failed" in answer:
        raise RuntimeError(f"rank 0 failed while deciding the {name}: {answer['failed']}")
    return answer["value"]


def run_id_from_env() -> str | None:
    """The run id a launcher gives every process: Slurm's job (or array task), or torchrun's
    ``--rdzv-id`` (torchrun's default id, ``none``, names nothing)."""
    env = os.environ
    if _slurm_launched() and env.get("SLURM_JOB_ID"):
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm-{env['SLURM_JOB_ID']}"
    rdzv = env.get("TORCHELASTIC_RUN_ID", "")
    if rdzv and rdzv != "none":
        return re.sub(r"[^A-Za-z0-9._-]", "_", rdzv)
    return None


_AGREED_RUN_ID: str | None = None


def run_id(given: Any = None) -> str:
    """The run folder's name (the ``lmim.run_id`` resolver): ``given`` when set, else the
    launcher's id, else rank 0's start time (see the module docstring)."""
    global _AGREED_RUN_ID
    if given not in (None, ""):
        return str(given)
    from_env = run_id_from_env()
    if from_env is not None:
        return from_env
    endpoint = launched_endpoint()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if endpoint is None:
        return stamp
    # Once per process: a second agreement would wait for a decision rank 0 never makes.
    if _AGREED_RUN_ID is None:
        _AGREED_RUN_ID = str(share("run_id", lambda: stamp, endpoint, per_attempt=False))
    return _AGREED_RUN_ID


def on_rank_zero(value: Any) -> Any:
    """``value`` on global rank 0, None elsewhere (the ``lmim.on_rank_zero`` resolver: only
    rank 0 writes Hydra's ``.hydra`` folder into the shared run folder)."""
    return value if is_rank_zero() else None
