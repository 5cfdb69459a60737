"""What a resumed run continues with: the data settings its checkpoint was trained on (unless the
command line gives others), and a warning where the settings given differ from the checkpoint's."""

from __future__ import annotations

import dataclasses
import logging

from data.config import DataConfig
from model import ModelConfig

log = logging.getLogger("train")


def data_as_trained(ckpt: dict, data: DataConfig, explicit: set[str]) -> DataConfig:
    """The data settings a resumed run continues on: the checkpoint's, except those given on the
    command line (data=<group> or experiment=: all of this run's)."""
    saved = (ckpt.get("config") or {}).get("data")
    if not isinstance(saved, dict) or explicit & {"data", "experiment"}:
        return data
    known = {f.name for f in dataclasses.fields(DataConfig)}
    mine = {k: getattr(data, k) for k in {e.removeprefix("data.") for e in explicit if e.startswith("data.")} & known}
    resolved = DataConfig(**{**{k: v for k, v in saved.items() if k in known}, **mine})
    if resolved != data:
        log.info("resuming on the data the checkpoint was trained on (data.source=%s%s)%s", resolved.source,
                 f", data.path={resolved.path}" if resolved.path else "",
                 f"; from the command line: {', '.join(sorted(mine))}" if mine else "")
    return resolved


def warn_if_resume_differs(ckpt: dict, model_cfg: ModelConfig, meta: dict, explicit: set[str] | None) -> None:
    """Resuming keeps the checkpoint's model; say so when settings given for this run differ from it
    (explicit: only those given on the command line; None: all of cfg.model)."""
    given = model_cfg.to_dict()
    changed = {k: (v, given[k]) for k, v in ckpt["model_config"].items() if given.get(k) != v and (
        explicit is None or f"model.{k}" in explicit or explicit & {"model", "experiment"})}
    if changed:
        log.warning("resuming with the checkpoint's model; ignoring changed model settings %s",
                    ", ".join(f"model.{k}: {old} -> {new}" for k, (old, new) in changed.items()))
    if ckpt.get("data", {}).get("meta", {}).get("fingerprint") != meta.get("fingerprint"):
        log.warning("resuming on other data than the checkpoint was trained on (prepared data fingerprint "
                    "differs): the data order cannot match an uninterrupted run")
