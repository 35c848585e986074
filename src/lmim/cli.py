"""The command-line entry points' common ground: Hydra's ``main`` with one-line errors.

Hydra composes the config inside ``hydra.main``, before an entry point's function runs, and
reports a mistyped key or an unknown group option in several lines with exit status 1 (and, for
a key, a ``+key=value`` hint that leads to a ``TypeError`` later). :func:`hydra_entry` runs
``hydra.main`` so that these errors reach it, and reports them as lmim reports every bad input:
one line ``lmim: error: ...`` on stderr naming the key and the fix (with a "did you mean"
suggestion), exit status 2. Everything else of Hydra (``--help``, ``--cfg``, ``-m``,
``hydra.*`` overrides, ``+new.key=value``) is untouched; ``HYDRA_FULL_ERROR=1`` still shows
Hydra's own report.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from lmim.errors import ConfigError

PREFIX = "lmim: error: "


class SkipLogger(logging.Filter):
    """Drops the records of one logger and its children.

    Hydra's console handler takes it for ``lightning`` (``conf/hydra/default.yaml``): the
    ``lightning`` package gives its logger a console handler of its own at import and lets its
    records reach the root logger too, so each Lightning line would be printed twice. Hydra's
    log file still gets them.
    """

    def __init__(self, logger: str) -> None:
        super().__init__()
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        return not (name == self.logger or name.startswith(self.logger + "."))


def end_progress_bars() -> None:
    """Close open tqdm bars (a fit that failed leaves Lightning's open) and flush stdout, so that
    a message written next starts on its own line instead of after the bar's last update."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):  # a bar whose stream is gone: nothing to end
            bar.close()
    sys.stdout.flush()


def one_line(text: str) -> str:
    """``text`` with its lines joined (a message that must fit on one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def report(message: str, prefix: str = PREFIX) -> None:
    """Print ``prefix + message`` as one line on stderr, on a line of its own."""
    end_progress_bars()
    print(prefix + one_line(message), file=sys.stderr, flush=True)


def fail(message: str, status: int = 2) -> NoReturn:
    """Report a bad input (:func:`report`) and exit with ``status`` (2)."""
    report(message)
    sys.exit(status)


def _paths(node: Any, prefix: str = "") -> Iterable[str]:
    """Every dotted key path of a config (nodes and leaves)."""
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from _paths(node._get_node(key), path)
    elif isinstance(node, ListConfig):
        return


def _closest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return found[0] if found else None


def _overrides() -> list[str]:
    """The overrides of this process's command line (Hydra's own parser)."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    except SystemExit:
        return []
    return list(args.overrides or [])


def _compose_valid(config_name: str, skip: str, with_hydra: bool) -> DictConfig | None:
    """The config composed from the command line's group choices (not ``skip``), to look valid
    keys up in; None if even that does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmim.utils import config_dir

    choices = [
        o
        for o in _overrides()
        if "=" in o
        and "." not in o.split("=", 1)[0]
        and "," not in o
        and o.split("=", 1)[0].lstrip("+~") != skip
    ]
    for attempt in (choices, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                return compose(config_name, overrides=attempt, return_hydra_config=with_hydra)
        except Exception:
            continue
        finally:
            GlobalHydra.instance().clear()
    return None


def _groups() -> list[str]:
    from lmim.utils import config_dir

    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def suggest_key(key: str, value: str | None, cfg: DictConfig | None) -> str:
    """``did you mean data.batch_size=4?`` for a mistyped ``data.batchsize``, or what the
    parent node holds."""
    assign = f"={value}" if value is not None else ""
    if cfg is None:
        return "see `--cfg job` for every key"
    parent, _, leaf = key.rpartition(".")
    scope = cfg if not parent else _select(cfg, parent)
    if isinstance(scope, DictConfig):
        names = [str(k) for k in scope]
        best = _closest(leaf, names)
        if best is not None:
            full = f"{parent}.{best}" if parent else best
            if not parent and best in _groups() and "." not in (value or ""):
                return f"did you mean {full}{assign}? (a config group: `--help` lists its options)"
            return f"did you mean {full}{assign}?"
        where = f"{parent} holds" if parent else "top-level keys are"
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        return f"{where} {shown} (`--cfg job` lists every key)"
    paths = [p for p in _paths(cfg) if key.startswith("hydra") or not p.startswith("hydra")]
    best = _closest(key, paths)
    if best is not None:
        return f"did you mean {best}{assign}?"
    return "see `--cfg job` for every key"


def _select(cfg: DictConfig, path: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
    except Exception:
        return None


def explain(err: BaseException, config_name: str) -> str:
    """One line for a Hydra composition or OmegaConf error: the key or option at fault and the
    fix, with the closest valid key or option when one is near."""
    text = str(err)
    if isinstance(err, MissingConfigException):
        missing = str(getattr(err, "missing_cfg_file", "") or "")
        options = list(getattr(err, "options", None) or [])
        group, _, option = missing.rpartition("/")
        if group and options:
            best = _closest(option, options, cutoff=0.5)
            hint = f"did you mean {group}={best}? " if best else ""
            return (
                f"{group}={option} is not an option of the '{group}' group: {hint}"
                f"(options: {', '.join(options)})"
            )
        return one_line(text.split("Config search path")[0])
    match = re.match(r"Could not override '([^']+)'", text)
    if isinstance(err, ConfigCompositionException) and match:
        key = match.group(1)
        value = None
        for override in _overrides():
            name, eq, val = override.partition("=")
            if eq and name.lstrip("~") == key:
                value = val
        cfg = _compose_valid(config_name, key, key.startswith("hydra"))
        if "." not in key and "No match in the defaults list" in text:
            return f"{key} is not a config group or key: {suggest_key(key, value, cfg)}"
        return f"{key} is not a config key: {suggest_key(key, value, cfg)}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the command line: {one_line(text)}"
    cause = err.__cause__
    detail = one_line(text)
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        detail += " " + one_line(str(cause))
    return f"{detail} (HYDRA_FULL_ERROR=1 shows Hydra's report)"


def _is_config_error(err: BaseException) -> bool:
    if isinstance(err, InstantiationException):
        return False  # a class that failed to build: its traceback is the useful report
    return isinstance(err, HydraException | OmegaConfBaseException)


def hydra_entry(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` for lmim's configs with one-line errors (exit status 2).

    Args:
        config_name: the primary config, ``conf/<config_name>.yaml``.

    Returns:
        A decorator turning ``task(cfg)`` into the entry point ``main()``.
    """
    import hydra

    from lmim.utils import config_dir

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(
            version_base="1.3", config_path=str(config_dir()), config_name=config_name
        )
        run = hydra_main(task)

        @functools.wraps(task)
        def main() -> Any:
            user_full_error = "HYDRA_FULL_ERROR" in os.environ
            # Hydra then lets errors out of hydra.main instead of printing them itself.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return run()
            except ConfigError as err:
                fail(str(err))
            except Exception as err:
                if user_full_error or not _is_config_error(err):
                    raise
                fail(explain(err, config_name))
            finally:
                if not user_full_error:
                    os.environ.pop("HYDRA_FULL_ERROR", None)

        return main

    return decorate
