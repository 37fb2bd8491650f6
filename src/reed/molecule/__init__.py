"""The 3D-molecule domain: molecules (EDM npz, SDF, SMILES), Semla/EGNN equivariant denoisers, equivariant flow
matching and its sampler, molecular-encoder targets, RDKit metrics and the molecule commands of ``reed``."""

from __future__ import annotations

from reed.config import LEGACY_KEYS
from reed.domains import DomainSpec, lazy
from reed.errors import ConfigError
from reed.molecule.config import TARGET_SOURCES, MoleculeConfig, validate_molecule

# RDKit (the extra reed[molecule]) is required by reed.molecule.chem, which every molecule computation imports; the
# config section, the commands and their flags load without it


def _upgrade(tree: dict) -> dict:
    """Old layout: the encoder-fitting settings were the top-level ``fit`` (width, steps, lr used here); the other
    top-level image sections were unused defaults."""
    fit = tree.get("fit") or {}
    tree = {k: v for k, v in tree.items() if k not in LEGACY_KEYS}
    sec = dict(tree.get("molecule") or {})
    if "fit" in sec and fit:
        raise ConfigError("config has both 'molecule.fit' and the old top-level 'fit'; keep only 'molecule.fit'")
    sec.setdefault("fit", {k: fit[k] for k in ("width", "steps", "lr") if k in fit})
    tree["molecule"] = sec
    return tree


DOMAIN = DomainSpec(name="molecule", config=MoleculeConfig, task=lazy("reed.molecule.task:MoleculeTask"),
                    denoiser=lazy("reed.molecule.task:build_denoiser_from_config"), target_sources=TARGET_SOURCES,
                    validate=validate_molecule, add_commands=lazy("reed.molecule.cli:add_commands"),
                    sample=lazy("reed.molecule.cli:cmd_sample"), evaluate=lazy("reed.molecule.cli:cmd_evaluate"),
                    owns_samples=lazy("reed.molecule.cli:owns_samples"), resume_may_change=("fit",),
                    upgrade=_upgrade, legacy_overrides=("fit",))
