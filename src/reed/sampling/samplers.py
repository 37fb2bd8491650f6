"""ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers for the interpolant flow, with CFG + guidance interval.

Time runs from t=1 (noise) to t=0 (data). ``model_fn(x, t, y) -> v`` takes x (B,...), t (B,) and labels y (B,)
and returns the velocity (B,...). The state is integrated in float64; the model sees ``model_dtype``.
Facts follow spec image.md section 7 (REPA/REED ``samplers.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reed.processes.flow import FlowProcess

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: a guidance scale: one number, or a tensor broadcast over the state's trailing dims (per element: REG guides its
#: packed representation token with its own scale, :meth:`reed.image.sit.SiT.guidance_scale`)
Scale = float | torch.Tensor


def guides(cfg_scale: Scale) -> bool:
    """Whether ``cfg_scale`` asks for guidance (some element above 1). The samplers ask once, of the caller's
    (host) scale, so deciding at every step never waits for the device."""
    return float(cfg_scale.max()) > 1.0 if isinstance(cfg_scale, torch.Tensor) else cfg_scale > 1.0


def _scale_on(cfg_scale: Scale, x: torch.Tensor) -> Scale:
    """``cfg_scale`` on ``x``'s device in float64 (a no-op once it is there)."""
    return cfg_scale.to(x.device, torch.float64) if isinstance(cfg_scale, torch.Tensor) else cfg_scale


def guided_velocity(model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor, *, null_class: int,
                    cfg_scale: Scale = 1.0, guidance: tuple[float, float] = (0.0, 1.0),
                    model_dtype: torch.dtype = torch.float32, decide_at: float | None = None,
                    guided: bool | None = None) -> torch.Tensor:
    """Velocity at scalar time ``t`` with classifier-free guidance when ``cfg_scale > 1`` and
    ``low <= decide_at <= high`` (``decide_at`` defaults to ``t``; Heun's corrector passes the step's start time).
    ``guided``: :func:`guides` of the scale, when the caller already knows it (None: decided here).

    Guidance runs the batch as [x, x] with labels [y, null] and returns u + w (c - u). Output (B,...) in float64.
    """
    b = x.shape[0]
    xin = x.to(model_dtype)
    s = t if decide_at is None else decide_at
    if (guides(cfg_scale) if guided is None else guided) and guidance[0] <= s <= guidance[1]:
        tt = torch.full((2 * b,), t, device=x.device, dtype=torch.float32)
        yy = torch.cat([y, torch.full_like(y, null_class)])
        out = model_fn(torch.cat([xin, xin]), tt, yy).to(torch.float64)
        cond, uncond = out[:b], out[b:]
        return uncond + _scale_on(cfg_scale, out) * (cond - uncond)
    tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
    return model_fn(xin, tt, y).to(torch.float64)


@torch.no_grad()
def ode_sample(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 50, heun: bool = False,
               null_class: int, cfg_scale: Scale = 1.0, guidance: tuple[float, float] = (0.0, 1.0),
               model_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euler (or Heun) ODE from t=1 to t=0 on ``steps+1`` equally spaced times; returns x0 (B,...) in model_dtype.

    Euler: x <- x + (t_next - t_cur) v(x, t_cur). Heun adds the trapezoid correction on all steps but the last;
    as in the reference sampler, whether the corrector's v(x_next, t_next) is guided is decided at ``t_cur``, so a
    step's predictor and corrector are both guided or both not (a guidance interval edge at ``t_next`` does not
    split a step).
    """
    if steps < 1:
        raise ValueError(f"ode_sample: steps must be >= 1, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    x = noise.to(torch.float64)
    kw = dict(null_class=null_class, cfg_scale=_scale_on(cfg_scale, x), guided=guides(cfg_scale), guidance=guidance,
              model_dtype=model_dtype)
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        v = guided_velocity(model_fn, x, t_cur, y, **kw)
        x_next = x + (t_next - t_cur) * v
        if heun and i < steps - 1:
            v_next = guided_velocity(model_fn, x_next, t_next, y, decide_at=t_cur, **kw)
            x_next = x + (t_next - t_cur) * 0.5 * (v + v_next)
        x = x_next
    return x.to(model_dtype)


@torch.no_grad()
def euler_maruyama_sde(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 250,
                       process: FlowProcess | None = None, null_class: int, cfg_scale: Scale = 1.0,
                       guidance: tuple[float, float] = (0.0, 1.0), last_t: float = 0.04,
                       generator: torch.Generator | None = None,
                       model_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE; ``steps`` network evaluations.

    Times: linspace(1, last_t, steps) then 0. Diffusion w(t) = 2t, score s from the velocity
    (:meth:`FlowProcess.score_from_velocity`), drift d = v - w s / 2. The first ``steps-1`` updates are
    x <- x + d dt + sqrt(w) sqrt(|dt|) xi (dt < 0); the last (last_t -> 0) is the deterministic x <- x + d dt.
    CFG is applied to the drift.
    """
    if steps < 2:
        raise ValueError(f"euler_maruyama_sde: steps must be >= 2, got {steps}")
    process = process or FlowProcess("linear")
    times = torch.linspace(1.0, last_t, steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(torch.float64)
    guided = guides(cfg_scale)  # decided and moved to the device once, not every step
    cfg_scale = _scale_on(cfg_scale, x)

    def drift(xx: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((xx.shape[0],), t, device=xx.device, dtype=torch.float64)
        v = model_fn(xx.to(model_dtype), tt.float(), labels).to(torch.float64)
        return v - 0.5 * (2.0 * t) * process.score_from_velocity(v, xx, tt)

    b = x.shape[0]
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t_cur
        if guided and guidance[0] <= t_cur <= guidance[1]:
            d = drift(torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class)]), t_cur)
            d = d[b:] + cfg_scale * (d[:b] - d[b:])
        else:
            d = drift(x, y, t_cur)
        x = x + d * dt
        if i < steps - 1:  # the last step (last_t -> 0) is deterministic
            xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
            x = x + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * xi
    return x.to(model_dtype)


def sample(model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, *, sampler: str = "euler", steps: int = 50,
           null_class: int, cfg_scale: Scale = 1.0, guidance: tuple[float, float] = (0.0, 1.0),
           process: FlowProcess | None = None, generator: torch.Generator | None = None,
           model_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dispatch by name: ``euler`` | ``heun`` (ODE) or ``sde`` (Euler-Maruyama)."""
    kw = dict(null_class=null_class, cfg_scale=cfg_scale, guidance=guidance, model_dtype=model_dtype)
    if sampler in ("euler", "heun"):
        return ode_sample(model_fn, noise, y, steps=steps, heun=sampler == "heun", **kw)
    if sampler == "sde":
        return euler_maruyama_sde(model_fn, noise, y, steps=steps, process=process, generator=generator, **kw)
    raise ValueError(f"unknown sampler '{sampler}', expected euler | heun | sde")
