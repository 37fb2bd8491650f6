"""The image domain: class-conditional SiT on pixels or VAE latents, flow process, image/text/VLM targets, ADM
metrics and the image commands of ``reed`` (prepare, caption, embed, embed-text, import, fit-encoder)."""

from __future__ import annotations

from reed.domains import DomainSpec, lazy
from reed.errors import ConfigError
from reed.image.config import LEGACY_KEYS, TARGET_SOURCES, ImageConfig, validate_image


def _upgrade(tree: dict) -> dict:
    """Old layout: the image sections were at the top level."""
    if tree.get("image") is not None:
        raise ConfigError(f"config has both an 'image' section and old top-level keys "
                          f"{[k for k in LEGACY_KEYS if k in tree]}; move them under 'image:'")
    tree = dict(tree)
    tree["image"] = {k: tree.pop(k) for k in LEGACY_KEYS if k in tree}
    if isinstance(tree["image"].get("sample"), dict):  # sample.use_ema was never read (reed sample has --raw)
        tree["image"]["sample"] = {k: v for k, v in tree["image"]["sample"].items() if k != "use_ema"}
    return tree


DOMAIN = DomainSpec(name="image", config=ImageConfig, task=lazy("reed.image.task:ImageTask"),
                    denoiser=lazy("reed.image.task:build_sit_denoiser"), target_sources=TARGET_SOURCES,
                    validate=validate_image, add_commands=lazy("reed.image.cli:add_commands"),
                    sample=lazy("reed.image.cli:cmd_sample"), evaluate=lazy("reed.image.cli:cmd_evaluate"),
                    resume_may_change=("sample", "fit"), upgrade=_upgrade,
                    legacy_overrides=LEGACY_KEYS, objective_terms=("dispersive", "self_align", "entangle",
                                                                      "attention"))
