"""Import the released REPA / REED SiT checkpoints into a reed checkpoint directory.

The released files are torch pickles holding either a bare state dict or a training checkpoint
``{"model", "ema", "opt", "args", "steps"}`` (spec image.md §6-7). Their layout is the reference SiT's:
``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``, ``pos_embed``,
``blocks.N.attn.{qkv,proj,q_norm,k_norm}``, ``blocks.N.mlp.{fc1,fc2}``, ``blocks.N.adaLN_modulation.1``,
``final_layer.{linear,adaLN_modulation.1}`` and ``projectors.K.{0,2,4}``. reed's SiT uses the same names, so the
import is a validated rename: the architecture is inferred from the tensor shapes (heads from the preset or the
standard SiT width table), projectors are kept or dropped, and the result is written as a reed checkpoint that
``reed sample`` / ``reed train --resume`` read like any other.

What the checkpoint's training ``args`` say is kept in the config (spec image.md §2-6, :func:`config_from_args`):
projector k is the k-th of the ``--enc-type`` image encoders (patch tokens at ``encoder_depth``), and, with a
``text_embeds_dir``, the last one is the caption-embedding target (mean-pooled, at ``encoder_depth_text``, or
``encoder_depth`` when that is None); ``repa_coeff`` gives the per-target coefficients, and ``proj_coeff``,
``time_schedule`` / ``cutoffs``, the curriculum, the path, the time sampling and the optimiser settings carry
over. A REED file (its args have ``repa_coeff`` / ``text_embeds_dir``) imports as ``method: reed``, a REPA one as
``repa``. Projectors are named after their targets (``projectors.<name>.net.*``; ``proj<K>`` without args).
The model slot (what ``reed train --resume`` continues) holds the file's raw ``model`` weights and its AdamW state
re-keyed to reed's parameter order; the EMA slot (what ``reed sample`` uses) holds the ``--which`` weights.

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
from reed.config import (
    Config,
    CurriculumConfig,
    ObjectiveConfig,
    TargetConfig,
    TrainConfig,
    config_from_tree,
    dump_config,
    to_dict,
)
from reed.errors import CheckpointError, ConfigError
from reed.image.config import DataConfig, ImageConfig, ModelConfig, ProcessConfig, SampleConfig
from reed.io import atomic_write_text

HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
_PROJ = re.compile(r"^projectors\.(\d+)\.(\d+)\.(weight|bias)$")


def read_official(path: str | Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state dict, args dict, training) from a released checkpoint; ``which`` picks ``ema`` or ``model`` in a
    training file, whose raw ``model`` weights (in their parameter order) and ``opt`` state are in ``training``
    (empty for a bare state dict)."""
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
    clean = lambda sd: {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}  # noqa: E731
    training = {}
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("opt"), dict):
        training = {"model": clean(obj["model"]), "opt": obj["opt"]}
    return clean(state), args, training


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


def _target_names(args: dict, n: int) -> tuple[list[str], int]:
    """(names of the ``n`` projectors' targets, how many are image targets) from the reference args: the
    ``--enc-type`` entries in order, then ``text`` for a ``text_embeds_dir``; ``proj<k>`` when args name none."""
    enc = args.get("enc_type")
    encs = [e.strip() for e in enc.split(",") if e.strip()] if isinstance(enc, str) and enc != "None" else []
    text = bool(args.get("text_embeds_dir"))
    if n == 0:
        return [], 0
    if not encs and not text:
        return [f"proj{k}" for k in range(n)], n
    names = [*encs, "text"] if text else encs
    if len(names) != n:
        raise CheckpointError(f"the checkpoint's args name {len(names)} alignment targets ({', '.join(names)}: "
                              f"enc_type={enc!r}, text_embeds_dir={args.get('text_embeds_dir')!r}) but it holds "
                              f"{n} projectors")
    out: list[str] = []
    for nm in names:  # ModuleDict keys: no dots, unique
        nm = nm.replace(".", "_")
        out.append(nm if nm not in out else f"{nm}_{len(out)}")
    return out, len(encs)


def config_from_args(args: dict, model_cfg: ModelConfig, proj: dict[str, torch.Tensor], dims: dict[int, int],
                     stores: dict[str, str], latents: str | None) -> tuple[Config, dict[int, str]]:
    """(the reed config a reference training run's ``args`` describe, {projector index: target name}).

    ``proj`` / ``dims`` are the kept projectors (:func:`convert_state`); ``stores`` maps target names to target
    store directories (``--target-store NAME=DIR``). Keys missing from ``args`` take the reference train.py's
    defaults. The reference's buggy cosine curriculum formulas become reed's intended ones (spec image.md §10).
    """
    # a REED run's args name its REED-only options; a file without training args keeps reed's default method
    reed = not set(args) - {"steps"} or any(k in args for k in ("repa_coeff", "text_embeds_dir", "encoder_depth_text"))
    names, n_img = _target_names(args, len(dims))
    unknown = sorted(set(stores) - set(names))
    if unknown:
        raise ConfigError(f"--target-store names unknown target(s) {unknown}; this checkpoint's targets are "
                          f"{names or 'none (import with --keep-projectors)'}")
    depth = int(args.get("encoder_depth") or 8)
    depth_text = int(args.get("encoder_depth_text") or depth)  # None: the image depth (reference SiT)
    coeffs = [float(c) for c in (args.get("repa_coeff") or [1.0] * len(names))] if reed else [1.0] * len(names)
    if names and len(coeffs) != len(names):
        raise CheckpointError(f"the checkpoint's args give {len(coeffs)} repa_coeff values {coeffs} for the "
                              f"{len(names)} alignment targets {names}")
    schedule = str(args.get("time_schedule") or "constant") if reed else "constant"
    cutoffs = [float(c) for c in (args.get("cutoffs") or [0.0, 1.0])]
    targets, by_index = [], {}
    for i, (k, z) in enumerate(sorted(dims.items())):
        name, image = names[i], i < n_img
        enc = name if image else str(args.get("text_embeds_dir") or "minilm")  # provenance only (source: store)
        path = stores.get(name, f"<target store for '{name}': reed import --target-store {name}=DIR>")
        targets.append(TargetConfig(
            name=name, source="store", path=path, encoder=enc, kind="tokens" if image else "pooled",
            modality="image" if image else "text", depth=min(depth if image else depth_text, model_cfg.depth),
            coeff=coeffs[i], time_weight=schedule, cutoffs=cutoffs, dim=z,
            projector_dim=int(proj[f"proj{k}.net.0.weight"].shape[0])))
        by_index[k] = name
    get = lambda key, default: args.get(key) if reed and args.get(key) is not None else default  # noqa: E731
    curriculum = CurriculumConfig(gen_start=int(get("start_diffusion_steps", 0)),
                                  gen_warmup=int(get("diffusion_warm_up_steps", 0)),
                                  gen_decay=str(get("diffusion_decay", "constant")),
                                  align_decay=str(get("repa_weight_decay", "constant")),
                                  align_steps=int(get("repa_steps", 0)))
    objective = ObjectiveConfig(method="reed" if reed else "repa", proj_coeff=float(args.get("proj_coeff", 0.5)),
                                curriculum=curriculum)
    train = TrainConfig(steps=int(args.get("max_train_steps") or 400_000),
                        batch_size=int(args.get("batch_size") or 256), lr=float(args.get("learning_rate") or 1e-4),
                        betas=[float(args.get("adam_beta1", 0.9)), float(args.get("adam_beta2", 0.999))],
                        weight_decay=float(args.get("adam_weight_decay") or 0.0),
                        grad_clip=float(args.get("max_grad_norm") or 1.0), ema_decay=0.9999,
                        mixed_precision=str(args.get("mixed_precision") or "fp16"))
    process = ProcessConfig(path=str(args.get("path_type") or "linear"),
                            time_sampling=str(args.get("weighting") or "uniform"))
    image = ImageConfig(data=DataConfig(name="latents", path=latents), model=model_cfg, process=process,
                        sample=SampleConfig(sampler="sde", steps=250, protocol="paper"))
    cfg = Config(domain="image", seed=int(args.get("seed") or 0), targets=targets, objective=objective, train=train,
                 sections={"image": image})
    return config_from_tree(to_dict(cfg)), by_index  # through the loader: values from args are type-checked


def reference_optimizer_state(names: list[str], opt: dict, params: dict[str, str]) -> dict[int, dict] | None:
    """The reference AdamW state re-keyed to reed's parameter order, or None when it cannot be matched.

    The reference optimizer runs over ``model.parameters()``, whose order is that of the ``model`` state dict
    ``names`` (the reference SiT has no buffers; its ``pos_embed`` is a frozen parameter without state).
    ``params`` maps a reference name to the index of reed's parameter (names without one, like ``pos_embed``, a
    buffer in reed, or dropped projectors, are skipped).
    """
    groups = opt.get("param_groups") or []
    order = [i for g in groups for i in g.get("params", [])]
    state = opt.get("state") or {}
    if len(order) != len(names) or not all(isinstance(v, dict) for v in state.values()):
        return None
    out = {}
    for pos, idx in enumerate(order):
        st = state.get(idx, state.get(str(idx)))
        if st and names[pos] in params:
            out[params[names[pos]]] = dict(st)
    return out


def import_official(path: str | Path, out: str | Path, *, which: str = "ema", keep_projectors: bool = False,
                    num_heads: int | None = None, vae: str | None = None, latents: str | None = None,
                    target_stores: dict[str, str] | None = None) -> Path:
    """Write ``out/checkpoints/step_<steps>/`` (and ``out/config.yaml``) from a released checkpoint and return
    that directory. ``target_stores`` sets the store directory of named targets (to resume training).

    The imported model is checked by loading it into reed's SiT (strict: every tensor must match).
    """
    from reed.checkpoint import load_into
    from reed.domains import align_terms, build_denoiser
    from reed.objective import ReedModule, active_terms

    state, args, training = read_official(path, which)
    model_cfg = infer_model(state, num_heads, args.get("model") if isinstance(args.get("model"), str) else None)
    den, proj, dims = convert_state(state, keep_projectors)
    cfg, by_index = config_from_args(args, model_cfg, proj, dims, dict(target_stores or {}), latents)
    model = build_denoiser(cfg)  # the ``which`` weights: what `reed sample` uses (the EMA slot)
    load_into(model, den, f"{path} ({which})")
    # what training continues from: the raw weights (and their projectors) of a training file, else ``which``
    raw_den, raw_proj, _ = convert_state(training["model"], keep_projectors) if training else (den, proj, dims)
    tc = cfg.train
    module = ReedModule(build_denoiser(cfg), active_terms(align_terms(cfg), cfg.objective.method),
                        model_cfg.hidden_size)
    load_into(module.denoiser, raw_den, f"{path} (model)")
    rename = {}  # proj<K>.net.* -> <target name>.net.*
    for key in raw_proj:
        head, rest = key.split(".", 1)
        rename[key] = f"{by_index[int(head.removeprefix('proj'))]}.{rest}"
    load_into(module.projectors, {rename[k]: v for k, v in raw_proj.items()}, f"{path} (projectors)")
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    opt_state, carried = opt.state_dict(), "fresh (the file has no optimizer state)"
    if training and training["opt"].get("param_groups"):
        index = {n: i for i, (n, _) in enumerate(module.named_parameters())}
        params = {k: index[f"denoiser.{k}"] for k in training["model"] if f"denoiser.{k}" in index}
        for k in training["model"]:  # projectors.K.L.weight -> projectors.<target>.net.L.weight
            m = _PROJ.match(k)
            ours = rename.get(f"proj{m.group(1)}.net.{m.group(2)}.{m.group(3)}") if m else None
            if ours:
                params[k] = index[f"projectors.{ours}"]
        moved = reference_optimizer_state(list(training["model"]), training["opt"], params)
        if moved is None:
            carried = "fresh (the file's optimizer state does not match its model's parameters)"
        else:
            opt_state["state"], carried = moved, "reference"
    steps = int(args.get("steps", 0) or 0)
    extra = {"imported_from": str(path), "which": which, "vae": vae, "optimizer": carried, "reference_args": {
        k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))}}
    text = dump_config(cfg)
    ck = save_checkpoint(Path(out), steps, model=module.state_dict(), ema=model.state_dict(), optimizer=opt_state,
                         scheduler=None, config_yaml=text, extra=extra)
    atomic_write_text(Path(out) / "config.yaml", text)  # the config to resume with: reed train <out>/config.yaml
    return ck
