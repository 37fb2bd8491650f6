"""Import the released REPA / REED SiT checkpoints into a reed checkpoint directory.

The released files are torch pickles holding either a bare state dict or a training checkpoint
``{"model", "ema", "opt", "args", "steps"}`` (spec image.md §6-7). Their layout is the reference SiT's:
``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``pos_embed``,
``blocks.N.attn.{qkv,proj,q_norm,k_norm}``, ``blocks.N.mlp.{fc1,fc2}``, ``blocks.N.adaLN_modulation.1``,
``final_layer.{linear,adaLN_modulation.1}`` and ``projectors.K.{0,2,4}``. reed's SiT uses the same names, so the
import is a validated rename: the architecture is inferred from the tensor shapes (heads from the preset or the
standard SiT width table), projectors are kept (as ``projectors.proj<K>.net.*``) or dropped, and the result is
written as a reed checkpoint that ``reed sample`` / ``reed train --resume`` read like any other.

Files are read with ``torch.load(weights_only=True)`` (argparse.Namespace is the only extra type allowed);
``.safetensors`` files are read directly.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch

from reed.checkpoint import save_checkpoint
from reed.config import Config, TargetConfig, dump_config, validate
from reed.errors import CheckpointError
from reed.image.config import DataConfig, ImageConfig, ModelConfig, SampleConfig

HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
_PROJ = re.compile(r"^projectors\.(\d+)\.(\d+)\.(weight|bias)$")


def read_official(path: str | Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, args dict) from a released checkpoint; ``which`` picks ``ema`` or ``model`` in a training file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many kinds
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, expected a state dict")
    args = obj.get("args")
    args = dict(vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {}))
    if isinstance(obj.get("steps"), int):
        args.setdefault("steps", obj["steps"])
    if which in obj and isinstance(obj[which], dict):
        state = obj[which]
    elif "x_embedder.proj.weight" in obj:
        state = obj
    else:
        raise CheckpointError(f"checkpoint {p} has neither an '{which}' entry nor SiT weights (keys: "
                              f"{sorted(obj)[:8]})")
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    return state, args


def infer_model(state: dict[str, torch.Tensor], num_heads: int | None = None, preset: str | None = None) -> ModelConfig:
    """Architecture from tensor shapes; heads from ``num_heads``, else the ``preset`` named in the checkpoint's args
    (when its width matches), else the SiT width table."""
    try:
        w = state["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        tokens = int(state["pos_embed"].shape[1])
        classes = int(state["y_embedder.embedding_table.weight"].shape[0]) - 1
    except KeyError as e:
        raise CheckpointError(f"checkpoint lacks the SiT tensor {e}") from None
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    grid = math.isqrt(tokens)
    from reed.image.sit import SIT_PRESETS

    named = SIT_PRESETS.get(preset or "", {})
    heads = num_heads or (named.get("num_heads") if named.get("hidden_size") == hidden else None)
    heads = heads or HEADS_BY_WIDTH.get(hidden)
    if heads is None:
        raise CheckpointError(f"cannot infer the number of heads for width {hidden}; pass --num-heads")
    mlp = int(state["blocks.0.mlp.fc1.weight"].shape[0]) / hidden
    return ModelConfig(preset="SiT-XL/2", depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                       mlp_ratio=mlp, qk_norm="blocks.0.attn.q_norm.weight" in state, input_size=grid * patch,
                       in_channels=channels, num_classes=classes)


def convert_state(state: dict[str, torch.Tensor], keep_projectors: bool) -> tuple[dict, dict, dict[int, int]]:
    """(denoiser state, projector state keyed ``proj<K>.net.*``, {K: z_dim})."""
    den, proj, dims = {}, {}, {}
    for k, v in state.items():
        m = _PROJ.match(k)
        if m:
            if keep_projectors:
                proj[f"proj{m.group(1)}.net.{m.group(2)}.{m.group(3)}"] = v
                if m.group(2) == "4" and m.group(3) == "weight":
                    dims[int(m.group(1))] = int(v.shape[0])
            continue
        den[k] = v
    return den, proj, dims


def import_official(path: str | Path, out: str | Path, *, which: str = "ema", keep_projectors: bool = False,
                    num_heads: int | None = None, vae: str | None = None, latents: str | None = None) -> Path:
    """Write ``out/checkpoints/step_<steps>/`` from a released checkpoint and return that directory.

    The imported model is checked by loading it into reed's SiT (strict: every tensor must match).
    """
    from reed.checkpoint import load_into
    from reed.domains import build_denoiser

    state, args = read_official(path, which)
    model_cfg = infer_model(state, num_heads, args.get("model") if isinstance(args.get("model"), str) else None)
    den, proj, dims = convert_state(state, keep_projectors)
    depth = int(args.get("encoder_depth", 8) or 8)
    targets = [TargetConfig(name=f"proj{k}", source="store", path=f"<store for projector {k}>", kind="tokens",
                            depth=min(depth, model_cfg.depth), dim=d, projector_dim=int(proj[f"proj{k}.net.0.weight"]
                                                                                      .shape[0]))
               for k, d in sorted(dims.items())]
    image = ImageConfig(data=DataConfig(name="latents", path=latents), model=model_cfg,
                        sample=SampleConfig(sampler="sde", steps=250))
    cfg = validate(Config(domain="image", targets=targets, sections={"image": image}))
    model = build_denoiser(cfg)
    load_into(model, den, f"{path} ({which})")
    weights = {f"denoiser.{k}": v for k, v in model.state_dict().items()}
    weights.update({f"projectors.{k}": v for k, v in proj.items()})
    steps = int(args.get("steps", 0) or 0)
    extra = {"imported_from": str(path), "which": which, "vae": vae, "reference_args": {
        k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    return save_checkpoint(Path(out), steps, model=weights, ema=model.state_dict(),
                           optimizer={"state": {}, "param_groups": []}, scheduler=None, config_yaml=dump_config(cfg),
                           extra=extra)
