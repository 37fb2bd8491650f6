"""Samplers as pure functions ``(model_fn, x, y, ...) -> x``."""

from reed.sampling.samplers import euler_maruyama_sde, guided_velocity, ode_sample, sample

__all__ = ["ode_sample", "euler_maruyama_sde", "guided_velocity", "sample"]
