"""reed: train diffusion and flow models with flexible representation guidance (REED, arXiv 2507.08980).

One training step, whatever the domain::

    loss = w_gen(step) * generative_loss + w_align(step) * sum_k c_k * s_k(t) * align_k(project_k(h_{d_k}), z_k)

Modules: :mod:`reed.curriculum` (weight schedules), :mod:`reed.align` (projectors, cosine losses),
:mod:`reed.processes.flow` (interpolants), :mod:`reed.objective`, :mod:`reed.image.sit`,
:mod:`reed.sampling` (ODE/SDE samplers), :mod:`reed.train` (trainer), :mod:`reed.config`.
"""

from reed.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, ReedError

__version__ = "0.1.0"
__all__ = ["ReedError", "ConfigError", "DataError", "CheckpointError", "NonFiniteLossError", "__version__"]
