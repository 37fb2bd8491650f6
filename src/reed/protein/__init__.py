"""The protein inverse-folding domain: structures, a ProteinMPNN-style denoiser under masked discrete diffusion,
protein targets (ESM-2, AF3), sequence design, metrics and the protein commands of ``reed`` (embed-protein)."""

from __future__ import annotations

from reed.config import LEGACY_KEYS
from reed.domains import DomainSpec, lazy
from reed.protein.config import TARGET_SOURCES, ProteinConfig, validate_protein

# biotite (the extra reed[protein]) is required by reed.protein.data, which every protein computation imports; the
# config section, the commands and their flags load without it, so `reed embed-protein` etc. say what to install


def _upgrade(tree: dict) -> dict:
    """Old layout: configs saved by protein runs held the (unused) image sections at the top level."""
    return {k: v for k, v in tree.items() if k not in LEGACY_KEYS}


# the denoiser computes a decoder layer's edge branch only when a target uses it, so some parameters can go
# without gradient in a step; DDP must be told
DOMAIN = DomainSpec(name="protein", config=ProteinConfig, task=lazy("reed.protein.task:ProteinTask"),
                    denoiser=lazy("reed.protein.task:build_mpnn_denoiser"), target_sources=TARGET_SOURCES,
                    validate=validate_protein, add_commands=lazy("reed.protein.cli:add_commands"),
                    sample=lazy("reed.protein.cli:cmd_sample"), evaluate=lazy("reed.protein.cli:cmd_evaluate"),
                    owns_samples=lazy("reed.protein.cli:owns_samples"), upgrade=_upgrade,
                    find_unused_parameters=True)
