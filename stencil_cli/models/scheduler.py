"""The sampler the Stencil method uses with SD1.5: DDIM with the settings of METHOD.md."""

from __future__ import annotations

from typing import Any

# steps_offset 0 and "leading" spacing give timesteps 980, 960, ... for 50 steps, as the reference code does.
SD15_DDIM_SETTINGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def sd15_ddim_scheduler(config: dict[str, Any] | None = None) -> Any:
    """A DDIMScheduler with the SD1.5 settings of METHOD.md (prediction type kept from `config`)."""
    from diffusers import DDIMScheduler

    settings = dict(SD15_DDIM_SETTINGS)
    if config and config.get("prediction_type"):
        settings["prediction_type"] = config["prediction_type"]
    return DDIMScheduler(**settings)
