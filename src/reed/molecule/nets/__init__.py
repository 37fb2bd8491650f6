"""Equivariant molecule denoisers: :class:`~reed.molecule.nets.denoiser.MoleculeDenoiser` over the Semla
(:mod:`.semla`) or EGNN (:mod:`.egnn`) network, with shared pieces in :mod:`.common`."""

from reed.molecule.nets.common import N_BOND_TYPES, N_CHARGES, masked_mean_pool, masked_sum_pool
from reed.molecule.nets.denoiser import MOLECULE_PRESETS, MoleculeDenoiser, build_molecule_model
from reed.molecule.nets.egnn import EGNN, EGNNLayer
from reed.molecule.nets.semla import CoordNorm, SemlaLayer, SemlaNet

__all__ = [
    "EGNN",
    "MOLECULE_PRESETS",
    "N_BOND_TYPES",
    "N_CHARGES",
    "CoordNorm",
    "EGNNLayer",
    "MoleculeDenoiser",
    "SemlaLayer",
    "SemlaNet",
    "build_molecule_model",
    "masked_mean_pool",
    "masked_sum_pool",
]
