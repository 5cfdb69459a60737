"""The named model sizes for code that runs without Hydra (scripts, tests): `model_preset(name)`
reads configs/model/<name>.yaml, the one place where each size is written down."""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


def model_preset(name: str) -> dict:
    """The fields of configs/model/<name>.yaml (all of ModelConfig's), for ModelConfig(**fields).
    An unknown name is a one-line ValueError that lists the valid ones."""
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
    if name not in names:  # also keeps a name such as ../train from reading another file
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(names)} (configs/model/)")
    fields = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml"), resolve=True)
    fields.pop("defaults", None)  # Hydra's: the schema the file is checked against
    return fields
