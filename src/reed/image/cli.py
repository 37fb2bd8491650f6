"""The image commands of ``reed``: fit-encoder, prepare-targets, prepare, caption, embed, embed-text, import, and
the image side of ``sample`` and ``evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

from reed.cli import Commands, print_report, process_info
from reed.errors import ConfigError
from reed.io import atomic_write_text, pick_device
from reed.store import STORE_DTYPES


def fit_dataset(cfg):
    """The images ``reed fit-encoder`` fits on: the training set, or ``image.fit.world_size`` images of a
    procedural world's encoder-fitting range."""
    from reed.image.data import load_dataset

    d, n = cfg.image.data, cfg.image.fit.world_size
    if n <= 0:
        return load_dataset(d)
    if d.name != "shapes":
        raise ConfigError(f"image.fit.world_size={n} needs a procedural world (image.data.name=shapes), not "
                          f"'{d.name}'; leave it 0 to fit on the training images")
    from reed.image.shapes import load_shapes

    return load_shapes(n, seed=d.seed, resolution=d.resolution, role="encoder")


def cmd_fit_encoder(args, cfg) -> int:
    """``reed fit-encoder CONFIG``: a VICReg CNN per ``fitted_encoder`` target, fitted on the run's images."""
    import torch

    from reed.image.targets.fitted_encoder import fit_encoder, linear_probe_accuracy, save_encoder

    todo = [t for t in cfg.targets if t.source == "fitted_encoder"]
    if not todo:
        print("no target with source 'fitted_encoder' in the config; nothing to fit")
        return 0
    ds = fit_dataset(cfg)
    pixels = ds.pixels(torch.arange(len(ds)))  # (N,C,H,W) in [-1,1]
    for tg in todo:
        out = Path(tg.path)
        if (out / "encoder.safetensors").is_file() and not args.force:
            print(f"encoder for target '{tg.name}' already fitted at {out} (use --force to refit)")
            continue
        f = cfg.image.fit
        torch.manual_seed(cfg.seed)
        enc, hist = fit_encoder(pixels, dim=f.dim, width=f.width, downsample=f.downsample, steps=f.steps,
                                batch_size=f.batch_size, lr=f.lr, seed=cfg.seed, progress=cfg.train.progress)
        save_encoder(enc, out)
        with torch.no_grad():
            feats = enc.pooled(pixels)
        acc = linear_probe_accuracy(feats.numpy(), ds.labels.numpy(), seed=cfg.seed)
        report = {"target": tg.name, "path": str(out), "vicreg_loss_first": hist[0], "vicreg_loss_last": hist[-1],
                  "linear_probe_accuracy": acc}
        atomic_write_text(out / "fit_report.json", json.dumps(report, indent=2) + "\n")
        print(f"fitted encoder '{tg.name}' -> {out}: VICReg loss {hist[0]:.3f} -> {hist[-1]:.3f}, "
              f"linear-probe accuracy {acc:.3f}")
    return 0


def cmd_prepare_targets(args, cfg) -> int:
    from reed.image.data import load_dataset
    from reed.image.targets.prepare import prepare_targets

    ds = load_dataset(cfg.image.data)
    out = prepare_targets(cfg.targets, ds, cfg.train.cache_dir, progress=cfg.train.progress)
    for name, z in out.items():
        print(f"target '{name}': {tuple(z.shape)}")
    return 0


def _check_guidance_flags(args) -> None:
    """Refuse a bad ``--cfg-scale`` / ``--guidance-low`` / ``--guidance-high`` before the model is loaded; the run's
    ``image.sample`` values stand in for the flags not given."""
    from reed.checkpoint import read_config_text, resolve_checkpoint
    from reed.config import config_from_yaml_text
    from reed.image.config import check_guidance

    if args.cfg_scale is None and args.guidance_low is None and args.guidance_high is None:
        return  # the run's own values were checked when its config was loaded
    ck = resolve_checkpoint(args.run)
    sc = config_from_yaml_text(read_config_text(ck), str(ck)).image.sample
    vals, names = [], []
    for flag, given, key in (("--cfg-scale", args.cfg_scale, "cfg_scale"),
                             ("--guidance-low", args.guidance_low, "guidance_low"),
                             ("--guidance-high", args.guidance_high, "guidance_high")):
        vals.append(getattr(sc, key) if given is None else given)
        names.append(flag if given is not None else f"the run's image.sample.{key}")
    check_guidance(*vals, names=tuple(names))


def cmd_sample(args) -> int:
    """``reed sample RUN``: images into an ADM-layout .npz, a grid and a JSON of the settings."""
    from reed.image.config import check_cls_cfg
    from reed.image.generate import generate

    if getattr(args, "structures", None):
        raise ConfigError(f"--structures is for protein runs; {args.run} is an image run")
    _check_guidance_flags(args)
    check_cls_cfg(args.cls_cfg_scale, "--cls-cfg-scale")
    rank, world, st = process_info()
    info = generate(args.run, num=args.num or 100, out=args.out, sampler=args.sampler, steps=args.steps,
                    cfg_scale=args.cfg_scale, cls_cfg_scale=args.cls_cfg_scale,
                    guidance=(args.guidance_low, args.guidance_high), seed=args.seed,
                    batch_size=args.batch_size, use_ema=not args.raw, labels=args.labels, vae=args.vae,
                    protocol=args.protocol,
                    device=str(st.device) if world > 1 else None, process_index=rank, num_processes=world,
                    barrier=st.wait_for_everyone, progress=rank == 0)
    if rank == 0:
        print(f"wrote {info['num']} samples to {info['npz']} and a grid to {info['grid']}")
    return 0


def cmd_embed(args, cfg) -> int:
    from reed.image.targets.embed import embed_target

    rank, world, st = process_info()
    out = args.out or next((t.store for t in cfg.targets if t.name == args.target and t.store), None)
    if not out:
        raise ConfigError(f"give --out or set targets.<i>.store for target '{args.target}'")
    rep = embed_target(cfg, args.target, out, dtype=args.dtype, shard_size=args.shard_size,
                       batch_size=args.batch_size, process_index=rank, num_processes=world,
                       progress=cfg.train.progress and rank == 0, barrier=st.wait_for_everyone)
    if rank == 0:
        print(f"target '{args.target}' {rep['shape']} x {rep['count']} -> {out} "
              f"({rep['written']} shards written here, {rep['skipped']} already there). Train with:\n"
              f"  targets.<i>.store={out}  (or source: store, path: {out})")
    return 0


def cmd_prepare(args) -> int:
    from reed.image.prepare import prepare_images, prepare_latents

    rank, world, _ = process_info()
    if args.what == "images":
        rep = prepare_images(args.src, args.out, resolution=args.resolution, shard_size=args.shard_size,
                             process_index=rank, num_processes=world, progress=rank == 0,
                             num_workers=args.num_workers)
    else:
        if not args.vae:
            raise ConfigError("reed prepare latents needs --vae (a diffusers AutoencoderKL directory or hub id)")
        rep = prepare_latents(args.src, args.out, vae=args.vae, batch_size=args.batch_size, device=args.device,
                              dtype=args.dtype, process_index=rank, num_processes=world, progress=rank == 0)
    if rank == 0:
        print(json.dumps({k: v for k, v in rep.items() if k != "skipped"} | {"skipped": len(rep.get("skipped", []))},
                         default=str))
    return 0


def _image_source(images_dir: str):
    from reed.image.shards import ImageShards

    shards = ImageShards(images_dir)
    return shards, (lambda idx: shards.images(idx))


def cmd_caption(args) -> int:
    from reed.image.targets.vlm import caption_images

    shards, fn = _image_source(args.images)
    rank, world, _ = process_info()
    rep = caption_images(args.model, fn, args.out, count=len(shards), prompt=args.prompt,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, shard_size=args.shard_size,
                         process_index=rank, num_processes=world, device=args.device, progress=rank == 0)
    print(json.dumps(rep, default=str))
    return 0


def cmd_embed_text(args) -> int:
    """Caption embeddings (sentence encoder, or (image, caption) through a VLM) into a target store."""
    import numpy as np

    from reed.image.targets.vlm import embed_captions_vlm, read_captions
    from reed.store import TargetStoreWriter

    captions = read_captions(args.captions)
    shards, images = _image_source(args.images) if args.images else (None, None)
    if args.vlm and images is None:
        raise ConfigError("--vlm needs --images (the prepared images the captions describe)")
    if shards is not None and len(shards) != len(captions):
        raise ConfigError(f"{len(captions)} captions in {args.captions} but {len(shards)} images in {args.images}")

    text_encoder = None
    if not args.vlm:
        from reed.image.targets.text import SentenceEncoder, resolve_text_encoder

        text_encoder = SentenceEncoder.from_pretrained(resolve_text_encoder(args.encoder), device=args.device)

    def rows(idx):
        caps = [captions[i] for i in idx]
        if text_encoder is None:  # the VLM is loaded once and kept by reed.image.targets.vlm
            return embed_captions_vlm(args.vlm, images(np.asarray(idx)), caps, layer=args.layer,
                                      batch_size=args.batch_size, device=args.device, progress=False)
        return text_encoder.encode(caps, batch_size=args.batch_size)

    dim = int(rows([0]).shape[-1])
    rank, world, st = process_info()
    w = TargetStoreWriter(args.out, source=f"vlm:{args.vlm}:layer{args.layer}" if args.vlm else f"text:{args.encoder}",
                          count=len(captions), shape=(dim,), dtype=args.dtype, shard_size=args.shard_size,
                          dataset_fingerprint=shards.fingerprint if shards is not None else "",
                          preprocessing={"pooling": "masked mean over real tokens", "captions": str(args.captions)})
    rep = w.write(rows, batch_size=args.batch_size, process_index=rank, num_processes=world, progress=rank == 0)
    st.wait_for_everyone()
    if rank == 0:
        w.finalize()
        print(f"caption embeddings ({dim}-d) x {len(captions)} -> {args.out} ({rep['written']} shards written)")
    return 0


def cmd_evaluate(args) -> int:
    """Standard metrics against a reference (--ref) and/or in-domain metrics against a run's data (--run).

    Every input is checked before any network runs: uint8 images, at least 2 samples, labels within the run's
    classes, no pickles."""
    samples = Path(args.samples)
    if not samples.is_file():
        raise ConfigError(f"samples file not found: {samples}")
    settings_file = samples.with_suffix(".json")
    try:
        sampling = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"sampling settings {settings_file} are not valid JSON ({e}); fix or remove it") from None
    result: dict = {"samples": str(samples), "sampling": sampling}
    if not args.ref and not args.run:
        raise ConfigError("reed evaluate needs --ref (reference batch/statistics) and/or --run (in-domain metrics)")
    if args.run:  # read and check the in-domain inputs first: a bad file fails before the (long) standard metrics
        import torch

        from reed.checkpoint import read_config_text, resolve_checkpoint
        from reed.config import config_from_yaml_text
        from reed.image.data import load_dataset
        from reed.image.metrics.indomain import load_samples

        ck = resolve_checkpoint(args.run)
        cfg = config_from_yaml_text(read_config_text(ck), str(ck))
        if cfg.domain != "image":
            raise ConfigError(f"--run {args.run} is a {cfg.domain} run; in-domain image metrics need an image run")
        ds = load_dataset(cfg.image.data)
        real_shape = tuple(ds.pixels(torch.arange(1)).shape[1:])
        x, y = load_samples(samples, ds.num_classes, real_shape)  # (N,C,H,W) in [-1,1], (N,) or None
    if args.ref:
        from reed.image.metrics.adm import evaluate

        result["standard"] = evaluate(samples, args.ref, inception=args.inception, dinov2=args.dinov2,
                                      metrics=args.metrics, batch_size=args.batch_size, extra=sampling)
    if args.run and cfg.image.data.name == "shapes":
        from reed.image.metrics.shapes_eval import shapes_evaluator

        ev = shapes_evaluator(cfg.image.data, cfg.train.cache_dir)
        if y is None:
            raise ConfigError(f"{samples} has no labels (arr_1); shapes scoring compares each sample with its label")
        result["in_domain"] = {**ev(x, y), "real_held_out": ev.real(len(x)),
                               "evaluator_held_out_accuracy": ev.held_out_accuracy, "data": "shapes",
                               "definition": "the shapes world's attribute evaluator (reed.image.metrics."
                               "shapes_eval): FD against held-out real images, label/attribute accuracy, "
                               "malformed fraction, attribute TV; real_held_out: what real images score (the floor)"}
    elif args.run:
        from reed.image.metrics.indomain import evaluator_for

        ev = evaluator_for(ds, cfg.train.cache_dir)
        result["in_domain"] = {**ev(x, y), "evaluator_held_out_accuracy": ev.held_out_accuracy,
                               "data": cfg.image.data.name, "definition": "Fréchet distance in the features of a "
                               "classifier trained on the data set; accuracy = classifier agrees with the label"}
    return print_report(result, args.out)


def cmd_import(args) -> int:
    from reed.image.official import import_official

    stores = {}
    for item in args.target_store or []:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--target-store {item!r} must look like NAME=DIR")
        stores[name] = directory
    ck = import_official(args.checkpoint, args.out, which=args.which, keep_projectors=args.keep_projectors,
                         num_heads=args.num_heads, vae=args.vae, latents=args.latents, target_stores=stores)
    print(f"imported {args.checkpoint} ({args.which} weights) -> {ck}; resume with: reed train "
          f"{Path(args.out) / 'config.yaml'} --out {args.out} --resume")
    return 0


def add_commands(commands: Commands) -> None:
    """The image domain's commands and its flags of ``sample`` / ``evaluate``."""
    sp = commands.command("fit-encoder", "fit the self-supervised encoder(s) the config's targets name",
                          cmd_fit_encoder, config=True)
    sp.add_argument("--force", action="store_true", help="refit even if the encoder exists")
    commands.command("prepare-targets", "compute and cache all alignment targets", cmd_prepare_targets, config=True)
    sp = commands.command("embed", "compute one target over the data set into a sharded target store", cmd_embed,
                          config=True)
    sp.add_argument("--target", required=True, help="target name in the config")
    sp.add_argument("--out", default=None, help="store directory (default: the target's `store` key)")
    sp.add_argument("--dtype", choices=list(STORE_DTYPES), default="float16",
                    help="storage precision (reed.store: int8 is a quarter of float32, bfloat16 has its range)")
    sp.add_argument("--shard-size", type=int, default=10_000)
    sp.add_argument("--batch-size", type=int, default=64)

    sp = commands.command("prepare", "prepare data: ImageFolder -> ADM-cropped uint8 shards, or -> VAE latents",
                          cmd_prepare)
    sp.add_argument("what", choices=["images", "latents"])
    sp.add_argument("src", help="ImageFolder root (images) or a prepared images dir (latents)")
    sp.add_argument("out")
    sp.add_argument("--resolution", type=int, default=256)
    sp.add_argument("--shard-size", type=int, default=10_000)
    sp.add_argument("--num-workers", type=int, default=0)
    sp.add_argument("--vae", default=None, help="diffusers AutoencoderKL dir or hub id (latents)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--dtype", choices=["float16", "float32"], default="float32")
    sp.add_argument("--device", default=str(pick_device()))

    sp = commands.command("caption", "caption prepared images with a VLM (sharded, resumable)", cmd_caption)
    sp.add_argument("images", help="prepared images dir")
    sp.add_argument("out", help="captions dir")
    sp.add_argument("--model", required=True, help="transformers image-text-to-text model dir or hub id")
    sp.add_argument("--prompt", default="Describe this image.")
    sp.add_argument("--max-new-tokens", type=int, default=200)
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--device", default=str(pick_device()))

    sp = commands.command("embed-text", "embed captions (or image+caption through a VLM) into a target store",
                          cmd_embed_text)
    sp.add_argument("captions", help="captions dir written by `reed caption`")
    sp.add_argument("out", help="target store dir")
    sp.add_argument("--encoder", default="minilm", help="sentence encoder: 'minilm' or a local model dir")
    sp.add_argument("--vlm", default=None, help="VLM dir/hub id: embed the (image, caption) dialogue instead")
    sp.add_argument("--images", default=None, help="prepared images dir (required with --vlm)")
    sp.add_argument("--layer", type=int, default=15, help="VLM hidden layer (0 = input embeddings)")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--shard-size", type=int, default=10_000)
    sp.add_argument("--dtype", choices=list(STORE_DTYPES), default="float16",
                    help="storage precision (reed.store: int8 is a quarter of float32, bfloat16 has its range)")
    sp.add_argument("--device", default=str(pick_device()))

    sp = commands.command("import", "import a released REPA/REED SiT checkpoint as a reed checkpoint", cmd_import)
    sp.add_argument("checkpoint", help="released .pt (bare state dict or {model, ema, args, ...}) or .safetensors")
    sp.add_argument("--out", required=True, help="directory to create (a reed run directory)")
    sp.add_argument("--which", choices=["ema", "model"], default="ema", help="weights to take from a training file")
    sp.add_argument("--keep-projectors", action="store_true", help="keep the alignment projectors")
    sp.add_argument("--num-heads", type=int, default=None, help="attention heads (default: SiT table by width)")
    sp.add_argument("--vae", default=None, help="VAE (dir or hub id) to decode samples with")
    sp.add_argument("--latents", default=None, help="prepared latents dir, to continue training")
    sp.add_argument("--target-store", action="append", metavar="NAME=DIR",
                    help="target store of the kept projector NAME (an --enc-type entry, or 'text'), to continue "
                    "training; repeat per target")

    sp = commands.shared("sample")
    sp.add_argument("--sampler", choices=["euler", "heun", "sde"], default=None)
    sp.add_argument("--cfg-scale", type=float, default=None)
    sp.add_argument("--guidance-low", type=float, default=None)
    sp.add_argument("--guidance-high", type=float, default=None)
    sp.add_argument("--cls-cfg-scale", type=float, default=None,
                    help="REG runs: guidance scale of the generated representation token (default "
                    "image.sample.cls_cfg_scale, null = --cfg-scale; 0 = its conditional drift alone)")
    sp.add_argument("--labels", choices=["balanced", "random"], default=None,
                    help="class labels: i mod K (balanced) or uniform random (default: the protocol's)")
    sp.add_argument("--protocol", default=None,
                    help="reed (balanced labels, the run's VAE, rounded pixels) or paper (the reference "
                    "generate.py: random labels, sd-vae-ft-ema, truncated pixels); default image.sample.protocol")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--vae", default=None, help="VAE to decode a latent-space model's samples (default: the run's; "
                    "--protocol paper: stabilityai/sd-vae-ft-ema)")
    sp = commands.shared("evaluate")
    sp.add_argument("--ref", default=None, help="images: reference ADM batch .npz, images (.npz/.npy/folder)")
    sp.add_argument("--inception", default=None, help="FID Inception weights file (pt_inception-2015-12-05-*.pth)")
    sp.add_argument("--dinov2", default=None, help="DINOv2 directory for FD_DINOv2")
    sp.add_argument("--metrics", default="fid,sfid,is,pr")
