"""Protein alignment targets: the per-chain target store (:mod:`.store`; variable-length per-residue and pair
arrays, so not the generic :mod:`reed.store`), ESM-2 targets (:mod:`.esm2`) and AF3 import (:mod:`.af3`)."""

from reed.protein.targets.af3 import AF3_EMBEDDINGS, AF3_KEYS, import_af3_embeddings, read_af3_job_sequence
from reed.protein.targets.esm2 import (
    DEFAULT_ESM2,
    ESM_VOCAB,
    embed_proteins_esm2,
    esm2_embeddings,
    load_esm2,
    save_random_esm2,
)
from reed.protein.targets.store import (
    FORMAT,
    INDEX,
    ITEMS,
    PAIR_KINDS,
    PER_RESIDUE_KINDS,
    VERSION,
    ProteinTargetStore,
    ProteinTargetWriter,
    sequence_window,
)

__all__ = ["AF3_EMBEDDINGS", "AF3_KEYS", "DEFAULT_ESM2", "ESM_VOCAB", "FORMAT", "INDEX", "ITEMS", "PAIR_KINDS",
           "PER_RESIDUE_KINDS", "VERSION", "ProteinTargetStore", "ProteinTargetWriter", "embed_proteins_esm2",
           "esm2_embeddings", "import_af3_embeddings", "load_esm2", "read_af3_job_sequence", "save_random_esm2",
           "sequence_window"]
