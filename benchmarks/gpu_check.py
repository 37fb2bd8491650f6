"""One-call device check (``make gpu-check``): does every domain train, resume and sample on this CUDA GPU, and how
fast do SiT-B/2 and SiT-XL/2 train here?

Run on a machine with one CUDA GPU and nothing else reachable (no downloads: every network has random weights, which
train and time exactly as pretrained ones do). In under 8 minutes on a current GPU it

1. records the environment: torch / CUDA versions, the device, bf16 support and the scaled-dot-product-attention
   kernels that run SiT-XL/2's attention shape in bf16 (flash, memory-efficient, cuDNN, math);
2. trains each domain a few steps through the CLI in bf16 with data-loader workers (``image``: REPA on the digits
   with a quickly fitted encoder; ``protein``: the dispersive loss on the PDB files; ``molecule``: the QM9 sample),
   interrupts and resumes the image run and compares its loss curve with the uninterrupted one, samples from every
   run on the GPU (``reed sample``), and trains the image run with ``train.compile=true``;
3. counts the host syncs of a short training run with ``torch.cuda.set_sync_debug_mode`` (set-up, the two logged
   steps and the final checkpoint included, so the count is an upper bound of the per-step syncs);
4. measures training throughput (steps/s, images/s, peak memory, model FLOP utilisation) of SiT-B/2 and SiT-XL/2 at
   batch 32 and 64 on 4x32x32 latent-shaped inputs with a stored DINOv2-B-shaped token target (256 x 768, float16,
   REPA's depths 4 and 8, projector 2048) through :func:`reed.train.train`, and the per-batch cost of the two ways to
   get that target: reading the store (host read, copy, dequantise) and running DINOv2-B online (random weights,
   bf16, eager and compiled).

Every check is recorded (``ok`` / ``failed`` with the error / ``skipped`` with the reason, e.g. a missing optional
package) in ``<out>/gpu_<device>.json``; the script exits 1 if any check failed. ``--dry-run`` runs the same code on
the CPU with tiny presets (a test runs it: ``tests/core/test_gpu_check.py``); its JSON is ``gpu_dry-run.json``.

    make gpu-check                                   # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu   # on the CPU, tiny presets, about a minute

Data: ``--data`` (default ``../shared/data`` beside the repository) holds ``pdb/`` and ``qm9_test.npz``; on a GPU
machine without it, copy that folder into the checkout (e.g. ``.gpu-data/``) and pass ``--data .gpu-data``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import logged_steps_per_second

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

#: dense bf16 tensor-core peak (FLOP/s) by device-name fragment, for model FLOP utilisation (None: not listed)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L40": 181e12, "L4": 121e12, "A10": 125e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12,
             "V100": 125e12, "T4": 65e12, "MI300X": 1307e12, "MI250": 362e12}

#: per mode: the throughput grid and the sizes of the domain runs
MODES = {
    "gpu": {"presets": [("SiT-B/2", 4), ("SiT-XL/2", 8)], "batches": [32, 64], "latent": 32, "tokens": (256, 768),
            "projector": 2048, "examples": 1024, "steps": 60, "log_every": 10, "train_steps": 20, "workers": 2,
            "encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072}, "image_res": 256, "precision": "bf16"},
    "dry-run": {"presets": [("SiT-T/4", 2)], "batches": [4], "latent": 32, "tokens": (64, 32), "projector": 64,
                "examples": 16, "steps": 4, "log_every": 1, "train_steps": 4, "workers": 1,
                "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64}, "image_res": 32, "precision": "no"},
}


class Skip(Exception):  # noqa: N818 - a check that cannot run here (a missing optional package, no data)
    """A check that cannot run on this machine, with the reason."""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"


def _r(x: float | None, n: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), n)


def _cli(*argv: str) -> None:
    from reed.cli import main

    rc = main([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"`reed {' '.join(map(str, argv))}` exited with {rc}")


def _records(run: Path) -> list[dict]:
    from reed.train import read_jsonl

    return read_jsonl(run / "metrics.jsonl")


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"optional package '{module}' is not installed (pip install 'reed[all]')")


class Check:
    """The context of one gpu-check run: device, mode settings, scratch directory, results."""

    def __init__(self, mode: str, device: str, data: Path, work: Path):
        self.mode, self.m, self.device, self.data, self.work = mode, MODES[mode], torch.device(device), data, work
        self.cuda = self.device.type == "cuda"
        self.results: dict = {"checks": {}, "throughput": []}

    def common(self, workers: int | None = None) -> list[str]:
        """Overrides every domain run gets: bf16 on CUDA, data-loader workers, no progress bars."""
        m = self.m
        w = m["workers"] if workers is None else workers
        return [f"train.mixed_precision={m['precision']}", f"train.workers={w}", "train.progress=false",
                f"train.cache_dir={self.work / 'cache'}", "train.log_every=1", "train.sample_every=0"]

    def throughput_workers(self) -> int:
        """Workers hand batches over in shared memory (/dev/shm): a container's default 64 MB holds less than two
        batches of SiT-XL/2's stored targets (25 MB each at batch 64), so below 2 GiB the timed runs read on the
        main thread (recorded in the JSON)."""
        try:
            shm = shutil.disk_usage("/dev/shm").total
        except OSError:
            shm = 0
        self.results["shm_bytes"] = shm
        return self.m["workers"] if shm >= 2 << 30 or not self.cuda else 0

    def run(self, name: str, fn: Callable[[], dict | None]) -> None:
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            out = fn() or {}
            rec = {"status": "ok", **out}
        except Skip as e:
            rec = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the script exits 1 at the end
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc().splitlines()[-12:]}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.results["checks"][name] = rec
        print(f"[gpu-check] {name}: {rec['status']} ({rec['seconds']}s)"
              + (f" - {rec.get('error') or rec.get('reason')}" if rec["status"] != "ok" else ""), flush=True)

    # ------------------------------------------------------------------------------------------------ checks
    def environment(self) -> dict:
        env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "device": str(self.device)}
        if not self.cuda:
            return env
        p = torch.cuda.get_device_properties(self.device)
        env.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(8, 16, 256, 72, device=self.device, dtype=torch.bfloat16)  # SiT-XL/2: 16 heads of 72
        kernels = {}
        backends = (("flash", SDPBackend.FLASH_ATTENTION), ("memory_efficient", SDPBackend.EFFICIENT_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH))
        for name, backend in backends:
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize()
                kernels[name] = True
            except RuntimeError:
                kernels[name] = False
        env["sdpa_kernels_for_sit_xl2_bf16"] = kernels
        return env

    def _image_cfg(self, *extra: str) -> list[str]:
        return [f"targets.0.path={self.work / 'encoder'}", "objective.method=repa", "train.batch_size=32",
                "objective.curriculum.gen_warmup=2", "image.sample.steps=4", *self.common(), *extra]

    def image(self) -> dict:
        _need("sklearn")  # the embedded digits
        _cli("fit-encoder", DEMO, f"targets.0.path={self.work / 'encoder'}", "image.fit.steps=30",
             "train.progress=false")
        n = self.m["train_steps"]
        run = self.work / "image"
        _cli("train", DEMO, *self._image_cfg(f"train.steps={n}", f"train.checkpoint_every={n // 2}"), "--out", run)
        _cli("sample", run, "--num", "16", "--out", self.work / "image_samples.npz")
        if np.load(self.work / "image_samples.npz")["arr_0"].shape[0] != 16:
            raise RuntimeError("reed sample wrote the wrong number of images")
        recs = _records(run)
        return {"steps": n, "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"], "samples": 16}

    def resume(self) -> dict:
        if "image" not in self.results["checks"] or self.results["checks"]["image"]["status"] != "ok":
            raise Skip("needs the image run")
        n = self.m["train_steps"]
        run = self.work / "image_resumed"
        args = self._image_cfg(f"train.steps={n}", f"train.checkpoint_every={n // 2}")
        _cli("train", DEMO, *args, "--out", run, "--stop-at", str(n // 2 + 1))
        _cli("train", DEMO, *args, "--out", run, "--resume")
        a, b = _records(self.work / "image"), _records(run)
        if [r["step"] for r in a] != [r["step"] for r in b]:
            raise RuntimeError("the resumed run logged other steps than the uninterrupted one")
        diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
        if not diff <= 1e-3 * max(abs(x["loss"]) for x in a):
            raise RuntimeError(f"resumed loss curve differs from the uninterrupted one by up to {diff:.3g}")
        return {"max_abs_loss_difference": diff, "exact": diff == 0.0}

    def compiled(self) -> dict:
        if "image" not in self.results["checks"] or self.results["checks"]["image"]["status"] != "ok":
            raise Skip("needs the image run")
        n = self.m["train_steps"]
        run = self.work / "image_compiled"
        t0 = time.perf_counter()
        _cli("train", DEMO, *self._image_cfg(f"train.steps={n}", "train.checkpoint_every=0", "train.compile=true"),
             "--out", run)
        a, b = _records(self.work / "image"), _records(run)
        diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
        return {"seconds_with_compilation": round(time.perf_counter() - t0, 1),
                "max_abs_loss_difference_vs_eager": diff}

    def syncs(self) -> dict:
        """Host syncs inside unlogged training steps (set_sync_debug_mode warns on each synchronising call)."""
        if not self.cuda:
            raise Skip("sync debug mode needs CUDA")
        from reed.config import load_config
        from reed.train import train

        n = self.m["train_steps"]
        cfg = load_config(DEMO, self._image_cfg(f"train.steps={n}", "train.checkpoint_every=0",
                                                f"train.log_every={n + 1}"))
        caught: list[str] = []
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, self.work / "image_syncs")
            finally:
                torch.cuda.set_sync_debug_mode(0)
            caught = [str(x.message).splitlines()[0] for x in w if "synchroniz" in str(x.message).lower()]
        # logged steps (the first, the last), the checkpoint at the end and set-up sync by design
        return {"steps": n, "sync_warnings": len(caught), "per_step_upper_bound": round(len(caught) / n, 2),
                "examples": sorted(set(caught))[:8]}

    def protein(self) -> dict:
        pdb = self.data / "pdb"
        return self._domain("biotite", pdb, "protein_esm2_reed.yaml", [
            f"protein.data.path={pdb}", "protein.data.split=[0.6,0.2,0.2]", "protein.data.token_budget=300",
            "protein.model.preset=mpnn-small", "protein.eval_every=0", "protein.sample.steps=10"],
            ["--structures", pdb / "6MRR.pdb", "--out", self.work / "designs.fasta"])

    def molecule(self) -> dict:
        qm9 = self.data / "qm9_test.npz"
        return self._domain("rdkit", qm9, "molecule_qm9_reed.yaml", [
            f"molecule.data.path={qm9}", "molecule.data.limit=120", "molecule.data.atom_budget=500",
            "molecule.model.preset=egnn-small", "molecule.eval_every=0", "molecule.sample.steps=6"],
            ["--num", "8", "--out", self.work / "molecules.sdf"])

    def _domain(self, package: str, data: Path, recipe: str, overrides: list[str], sample: list) -> dict:
        """Two epochs of the dispersive loss (encoder-free: no target to prepare) through the CLI, then sampling."""
        _need(package)
        if not data.exists():
            raise Skip(f"no {data} (pass --data)")
        run = self.work / recipe.split("_")[0]
        _cli("train", ROOT / "configs" / recipe, *overrides, "objective.method=disp", "targets=[]",
             "train.epochs=2", "train.checkpoint_every=0", *self.common(), "--out", run)
        _cli("sample", run, *sample)
        recs = _records(run)
        return {"steps": len(recs), "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"]}

    # ------------------------------------------------------------------------------------------- throughput
    def _latent_data(self) -> tuple[Path, Path]:
        """4 x L x L latent-shaped inputs in [-1, 1] (npz) and a float16 token store of the paper's shape."""
        from reed.image.config import DataConfig
        from reed.image.data import load_dataset
        from reed.store import TargetStoreWriter

        m = self.m
        n, lat = m["examples"], m["latent"]
        path = self.work / "latents.npz"
        g = np.random.default_rng(0)
        np.savez(path, images=np.tanh(g.standard_normal((n, 4, lat, lat))).astype(np.float32),
                 labels=np.arange(n) % 1000)
        ds = load_dataset(DataConfig(name="npz", path=str(path)))
        store = self.work / "tokens_store"
        shutil.rmtree(store, ignore_errors=True)
        t, d = m["tokens"]
        w = TargetStoreWriter(store, source="gpu-check:random", count=n, shape=(t, d), dtype="float16",
                              shard_size=max(n // 2, 1), dataset_fingerprint=ds.fingerprint)
        w.write(lambda idx: torch.randn(len(idx), t, d), progress=False)
        w.finalize()
        return path, store

    def throughput(self) -> dict:
        m = self.m
        data, store = self._latent_data()
        peak = next((v for k, v in PEAK_BF16.items() if self.cuda and k in torch.cuda.get_device_name()), None)
        plan = [(p, d, b, False) for p, d in m["presets"] for b in m["batches"]]
        plan.append((*m["presets"][-1], m["batches"][-1], True))  # the largest, again with activation checkpointing
        rows = [self._timed_run(data, store, *item, peak) for item in plan]
        self.results["throughput"] = rows
        costs = self.results["targets"] = self._target_costs(data, store)
        online_ms = min(costs["online_dinov2b_ms"], costs["online_dinov2b_compiled_ms"])
        for r in rows:  # the online target's encoder adds its time to every step (same GPU, no overlap)
            if r["batch"] == costs["batch"] and r["steps_per_second"]:
                r["steps_per_second_online_target_estimate"] = _r(1 / (1 / r["steps_per_second"] + online_ms / 1e3), 3)
        return {"runs": len(rows), "peak_bf16_flops": peak,
                "online_estimate_rule": "1 / (1 / stored steps/s + the faster DINOv2-B time per batch)"}

    def _timed_run(self, data: Path, store: Path, preset: str, depth: int, batch: int, checkpointing: bool,
                   peak: float | None) -> dict:
        """Steps/s, images/s, peak memory and MFU of REPA training on the stored target, through reed.train."""
        from reed.config import load_config
        from reed.train import train

        m = self.m
        cfg = load_config(DEMO, [
            "image.data.name=npz", f"image.data.path={data}", f"image.model.preset={preset}",
            f"targets=[{{name: dino, source: store, path: {store}, kind: tokens, depth: {depth}, "
            f"projector_dim: {m['projector']}, dim: {m['tokens'][1]}}}]", "objective.method=repa",
            "objective.curriculum.gen_warmup=0", f"train.batch_size={batch}", f"train.steps={m['steps'] + 1}",
            f"train.log_every={m['log_every']}", "train.checkpoint_every=0", "train.lr=1e-4",
            f"train.activation_checkpointing={str(checkpointing).lower()}",
            *[o for o in self.common(self.throughput_workers()) if not o.startswith("train.log_every")]])
        if self.cuda:
            gc.collect()  # the previous run's model sits in a reference cycle (accelerate's wrapped forward)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run = self.work / f"tp_{_slug(preset)}_{batch}_{int(checkpointing)}"
        train(cfg, run, stop_at=m["steps"])  # one step short of train.steps: no final checkpoint to write
        sps = logged_steps_per_second(run)
        flops = self._step_flops(preset, batch, depth)
        row = {"preset": preset, "batch": batch, "repa_depth": depth, "activation_checkpointing": checkpointing,
               "workers": cfg.train.workers,
               "steps_per_second": _r(sps, 3), "images_per_second": _r(sps * batch, 1),
               "peak_memory_gib": _r(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None,
               "model_tflops_per_step": _r(flops / 1e12, 3), "mfu": _r(flops * sps / peak, 4) if peak else None}
        print(f"[gpu-check]   {row}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
        return row

    def _step_flops(self, preset: str, batch: int, depth: int) -> float:
        """FLOPs of one SiT forward + backward at this batch (torch.utils.flop_counter; projector and loss excluded)."""
        from torch.utils.flop_counter import FlopCounterMode

        from reed.image.sit import build_sit

        model = build_sit(preset, input_size=self.m["latent"], in_channels=4, num_classes=1000).to(self.device)
        x = torch.randn(batch, 4, self.m["latent"], self.m["latent"], device=self.device)
        t, y = torch.rand(batch, device=self.device), torch.randint(0, 1000, (batch,), device=self.device)
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            out, hid = model(x, t, y, taps=[depth])
            (out.float().square().mean() + hid[depth].float().square().mean()).backward()
        return float(counter.get_total_flops())

    def _target_costs(self, data: Path, store: Path) -> dict:
        """Milliseconds per batch of the two ways to get the token target: read the store or run DINOv2-B."""
        from transformers import Dinov2Config, Dinov2Model

        from reed.config import TargetConfig
        from reed.image.config import DataConfig
        from reed.image.data import load_dataset
        from reed.image.targets.prepare import OnlineEncoderTargets, StoreTargets

        m = self.m
        out: dict = {}
        batch = m["batches"][-1]
        ds = load_dataset(DataConfig(name="npz", path=str(data)))
        idx = torch.arange(batch)
        stored = StoreTargets(TargetConfig(name="dino", source="store", path=str(store), kind="tokens"), ds)
        out["store_read_ms"] = self._time(lambda: stored.read(idx))
        rows = stored.read(idx)
        out["store_copy_dequantize_ms"] = self._time(lambda: stored.finish(rows, self.device))
        enc_dir = self.work / "dinov2_random"
        Dinov2Model(Dinov2Config(image_size=224, patch_size=14, **m["encoder"])).save_pretrained(str(enc_dir))
        res = m["image_res"]
        g = np.random.default_rng(1)
        pix = _PixelsOnly(torch.from_numpy(g.integers(0, 256, (batch, 3, res, res), dtype=np.uint8)))
        for compiled in (False, True):
            tg = TargetConfig(name="dino", source="encoder", encoder="dinov2-vit-b", path=str(enc_dir),
                              kind="tokens", encoder_compile=compiled)
            online = OnlineEncoderTargets(tg, pix, self.device)
            images = online.read(idx)
            key = "online_dinov2b_compiled_ms" if compiled else "online_dinov2b_ms"
            out[key] = self._time(lambda: online.finish(images, self.device))  # noqa: B023 - called now
            out["online_dtype"] = str(online.encoder.dtype).removeprefix("torch.")
        out.update(batch=batch, tokens=list(m["tokens"]), store_dtype="float16", image_resolution=res)
        return out

    def _time(self, fn: Callable[[], object], reps: int = 5) -> float:
        fn()  # warm-up (and compilation)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        return round((time.perf_counter() - t0) / reps * 1e3, 3)


class _PixelsOnly:
    """A data set of uint8 images for an online encoder (``raw_images``), nothing else."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def raw_images(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long) % len(self.images)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same checks on the CPU with tiny presets")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="holds pdb/ and qm9_test.npz")
    ap.add_argument("--only", nargs="+", default=None, help="run only these checks (names as in the JSON)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or pass --dry-run for the CPU rehearsal",
              file=sys.stderr)
        return 2
    mode = "dry-run" if args.dry_run else "gpu"
    device = "cpu" if args.dry_run else "cuda"
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reed-gpu-check-") as tmp:
        c = Check(mode, device, Path(args.data), Path(tmp))
        checks = {"environment": c.environment, "image": c.image, "resume": c.resume, "compile": c.compiled,
                  "syncs": c.syncs, "protein": c.protein, "molecule": c.molecule, "throughput": c.throughput}
        cwd = os.getcwd()
        os.chdir(ROOT)  # the configs' relative paths
        try:
            for name, fn in checks.items():
                if args.only is None or name in args.only:
                    c.run(name, fn)
        finally:
            os.chdir(cwd)
    res = c.results
    env = res["checks"].get("environment", {})
    failed = [k for k, v in res["checks"].items() if v["status"] == "failed"]
    res = {"settings": {"mode": mode, "command": " ".join([sys.executable, *sys.argv]), "device": device,
                        "mixed_precision": MODES[mode]["precision"], "workers": MODES[mode]["workers"],
                        "tf32": True, "fused_optimizer": True, "finite_check": "log",
                        "throughput_grid": {k: MODES[mode][k] for k in ("presets", "batches", "latent", "tokens",
                                                                        "projector", "steps", "log_every")},
                        "mfu_rule": "FlopCounterMode FLOPs of SiT forward+backward per step x steps/s / dense bf16 "
                                    "peak of the device (PEAK_BF16)",
                        "wall_seconds": round(time.perf_counter() - t_start, 1)},
           "failed": failed, **res}
    name = "gpu_dry-run.json" if args.dry_run else f"gpu_{_slug(env.get('name', 'cuda'))}.json"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(res, indent=1) + "\n")
    print(f"gpu-check: wrote {out / name} ({res['settings']['wall_seconds']}s); "
          + (f"FAILED: {', '.join(failed)}" if failed else "every check passed or was skipped"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
