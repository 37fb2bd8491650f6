"""Model definitions."""

from reed.models.sit import SIT_PRESETS, SiT, build_sit, drop_labels

__all__ = ["SIT_PRESETS", "SiT", "build_sit", "drop_labels"]
