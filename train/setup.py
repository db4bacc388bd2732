"""Everything the training loop needs around it: building and validating models, data, text
encoder and teacher before any work starts; batches; distribution SDS on fakes; logging;
exporting the models the app and the next stage load.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dreamportrait.checkpoints import CheckpointError, read_model_metadata
from dreamportrait.generator import GeneratorConfig, TriPlaneGenerator, preset
from dreamportrait.text_encoder import TextEncoder
from dreamportrait.text_generator import DreamPortraitGenerator, TextConditionConfig
from train.config import TrainConfig
from train.discriminator import DiscriminatorConfig, DualDiscriminator
from train.discriminator_io import load_discriminator, save_discriminator

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"


@dataclass
class Built:
    data: "CachedData"
    G: torch.nn.Module
    D: DualDiscriminator
    text_encoder: TextEncoder | None
    sds: object | None
    init_kimg_total: float = 0.0     # images the starting checkpoint had seen over all its stages


# Data --------------------------------------------------------------------------------------

class ShardedSampler:
    """Endless shuffled indices, a disjoint shard per rank, with a resumable generator state."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int):
        self.n, self.rank, self.world = n, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = self._new_order(), 0

    def _new_order(self) -> torch.Tensor:
        perm = torch.randperm(self.n, generator=self.gen)
        return perm[self.rank::self.world] if self.n >= self.world else perm

    def take(self, k: int) -> torch.Tensor:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order, self.pos = self._new_order(), 0
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return torch.tensor(out)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.order, self.pos = s["order"], int(s["pos"])


class CachedData:
    """A captioned EG3D-format data set held in memory as uint8 (small data sets, fast steps)."""

    def __init__(self, path: str, seed: int):
        from train.data import PortraitDataset
        ds = PortraitDataset(path, train=True, seed=seed)
        self.images = torch.stack([((ds[i]["image"] + 1) * 127.5).round().to(torch.uint8) for i in range(len(ds))])
        self.labels = ds.labels.clone()
        self.captions = ds.captions
        self.rng = torch.Generator().manual_seed(seed + 17)

    def __len__(self) -> int:
        return len(self.labels)

    def sampler(self, rank: int, world_size: int, seed: int) -> ShardedSampler:
        return ShardedSampler(len(self), rank, world_size, seed)

    def images_at(self, idx: torch.Tensor, device) -> torch.Tensor:
        return (self.images[idx].to(device, torch.float32) / 127.5 - 1)

    def caption_at(self, i: int) -> str:
        caps = self.captions[i]
        return caps[int(torch.randint(len(caps), (1,), generator=self.rng))]


@dataclass
class Batch:
    real_img: torch.Tensor
    real_c: torch.Tensor
    gen_z: torch.Tensor
    gen_c: torch.Tensor
    gen_captions: list
    gen_cond: dict


def next_batch(data: CachedData, sampler: ShardedSampler, n: int, G, text_encoder, device) -> Batch:
    """Reals from this rank's shard; fakes get z ~ N(0, I) and a (camera, caption) pair drawn
    from the data set, so fake poses and prompts follow the data distribution."""
    idx = sampler.take(n)
    gen_idx = sampler.take(n)
    gen_captions = [data.caption_at(int(i)) for i in gen_idx]
    cond = {}
    if text_encoder is not None:
        with torch.no_grad():
            cond["text"] = text_encoder(gen_captions).to(device)
    return Batch(data.images_at(idx, device), data.labels[idx].to(device),
                 torch.randn(n, G.config.z_dim, device=device), data.labels[gen_idx].to(device), gen_captions, cond)


# Models ------------------------------------------------------------------------------------

def build_text_encoder(cfg: TrainConfig) -> TextEncoder:
    t = cfg.text
    if t.sd_pipeline:
        return TextEncoder.from_sd_pipeline(t.sd_pipeline)
    if t.open_clip_config:
        return TextEncoder.from_config(t.open_clip_config, seed=t.seed)
    if t.open_clip_folder:
        return TextEncoder.from_clip_folder(t.open_clip_folder)
    if t.open_clip_model:
        return TextEncoder.from_open_clip(t.open_clip_model, t.open_clip_pretrained)
    raise ValueError("stage1/stage2 need a text encoder: set text.open_clip_model (+ open_clip_pretrained), "
                     "text.open_clip_config, text.open_clip_folder or text.sd_pipeline")


def _stage_init_dir(cfg: TrainConfig, stage: str) -> Path | None:
    init = cfg.stage(stage).init
    if not init:
        return None
    p = Path(init)
    d = p.parent if p.suffix == ".safetensors" else p
    if not (d / GENERATOR_FILE).exists():
        raise FileNotFoundError(f"{stage}.init={init!r}: no {GENERATOR_FILE} there; run the previous stage first "
                                "or convert EG3D weights with `python -m dreamportrait.convert_eg3d`")
    return d


def build(cfg: TrainConfig, stage: str, device: torch.device) -> Built:
    """Validate inputs (data, init checkpoints, text encoder, teacher) and build everything."""
    if not cfg.data or not Path(cfg.data).exists():
        raise FileNotFoundError(f"data set {cfg.data!r} not found; create one with `python -m dreamportrait.synthetic "
                                "--out DIR ...` or `python -m train.prepare ...`, then pass data=DIR")
    teacher_folder = None
    if stage == "stage2":
        from train.teacher import resolve_teacher_folder, check_teacher_folder
        if not cfg.teacher:
            raise ValueError("stage2 needs a diffusion teacher: set teacher=FOLDER (a Stable-Diffusion-style folder)")
        teacher_folder = resolve_teacher_folder(cfg.teacher)
        check_teacher_folder(teacher_folder)
    init_dir = _stage_init_dir(cfg, stage)
    init_kimg_total = 0.0
    text_encoder = build_text_encoder(cfg).to(device) if stage != "prior" else None
    if init_dir is not None:
        meta = read_model_metadata(init_dir / GENERATOR_FILE)
        init_kimg_total = float(meta.extra.get("kimg_total", meta.extra.get("kimg", 0.0)))
        if meta.kind == DreamPortraitGenerator.KIND:
            G = DreamPortraitGenerator.from_pretrained(init_dir / GENERATOR_FILE)
            if text_encoder is not None and G.text_config.text_dim != text_encoder.width:
                raise CheckpointError(f"{init_dir / GENERATOR_FILE} expects text features of width "
                                      f"{G.text_config.text_dim}, the text encoder gives {text_encoder.width}")
        else:
            G = TriPlaneGenerator.from_pretrained(init_dir / GENERATOR_FILE)
        D = load_discriminator(init_dir / DISCRIMINATOR_FILE) if (init_dir / DISCRIMINATOR_FILE).exists() else None
    else:
        if stage == "stage2":
            raise ValueError("stage2 must start from a stage1 checkpoint: set stage2.init")
        gen_cfg = preset(cfg.generator) if isinstance(cfg.generator, str) else GeneratorConfig.from_dict(cfg.generator)
        G, D = TriPlaneGenerator(gen_cfg), None
    G.neural_rendering_resolution = cfg.gan.neural_rendering_resolution_initial
    if stage != "prior" and not isinstance(G, DreamPortraitGenerator):
        text_cfg = TextConditionConfig(text_dim=text_encoder.width, adapter_resolutions=cfg.text.adapter_resolutions,
                                       adapter_count=cfg.text.adapter_count)
        G = DreamPortraitGenerator.from_eg3d(G, text_cfg)
    if D is None:
        c = G.config
        D = DualDiscriminator(DiscriminatorConfig(img_resolution=c.img_resolution, channel_base=c.channel_base,
                                                  channel_max=c.channel_max, mbstd_group_size=4))
    if D.config.img_resolution != G.config.img_resolution:
        raise CheckpointError(f"discriminator resolution {D.config.img_resolution} != generator {G.config.img_resolution}")
    data = CachedData(cfg.data, cfg.seed)
    res = data.images.shape[-1]
    if res != G.config.img_resolution:
        raise ValueError(f"data set images are {res}x{res} but the generator outputs {G.config.img_resolution}; "
                         "write the data set at the generator's resolution")
    sds = None
    if stage == "stage2":
        from train.distribution_sds import DistributionSDS
        from train.teacher import DiffusionTeacher
        sds = DistributionSDS(DiffusionTeacher.from_pretrained(teacher_folder, device=device), cfg.sds)
    return Built(data, G.to(device).train(), D.to(device).train(), text_encoder, sds, init_kimg_total)


# Steps ---------------------------------------------------------------------------------------

def autocast(cfg: TrainConfig, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sds_loss(sds, captions: list[str]):
    """A Gmain extra term: distribution SDS on the rendered fakes with their captions."""
    def term(gen_img: dict) -> tuple[torch.Tensor, dict]:
        text_emb = sds.teacher.encode_prompts(captions)
        out = sds(gen_img["image"].float(), text_emb)
        return out.loss, {"loss/sds": out.loss.item(), "sds/t_mean": out.stats["t_mean"].item()}
    return term


def gather_rng(state: dict, info) -> list:
    """Every rank's RNG state (a list indexed by rank), so a resumed run continues each exactly."""
    if not info.enabled:
        return [state]
    out = [None] * info.world_size
    dist.all_gather_object(out, state)
    return out


# Export and logging --------------------------------------------------------------------------

def export(run_dir: Path, G_ema, D, text_encoder, cfg: TrainConfig, stage: str, cur_nimg: int,
           init_kimg_total: float) -> None:
    """Write the generator (EMA) and discriminator the next stage, the app and evaluation load.
    ``kimg`` counts this stage's images, ``kimg_total`` all stages' since initialisation."""
    extra = {"stage": stage, "kimg": cur_nimg / 1000, "kimg_total": init_kimg_total + cur_nimg / 1000,
             "train_preset": cfg.preset, "data": cfg.data}
    if text_encoder is not None:
        extra["text_encoder"] = text_encoder.describe()
    G_ema.save_pretrained(run_dir / GENERATOR_FILE, extra=extra)
    save_discriminator(D, run_dir / DISCRIMINATOR_FILE)


class Logger:
    """Rank-0 progress bar, JSON-lines log of every step, tensorboard scalars and image grids."""

    def __init__(self, run_dir: Path, info, cfg: TrainConfig, stage: str, total_nimg: int, cur_nimg: int,
                 progress: bool, text_encoder: TextEncoder | None):
        self.info, self.cfg, self.stage, self.total = info, cfg, stage, total_nimg
        self.text_encoder = text_encoder
        self.run_dir = run_dir
        self.bar = self.tb = self.file = None
        self.t0, self.n0 = time.time(), cur_nimg
        self.next_image = cur_nimg
        if not info.is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"stage": stage, **cfg.to_dict()}, indent=1))
        self.file = open(run_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_nimg / 1000, initial=cur_nimg / 1000, unit="kimg", desc=stage,
                            bar_format="{desc}: {n:.3f}/{total:.3f} kimg |{bar}| {elapsed}<{remaining} {postfix}")

    def step(self, step: int, cur_nimg: int, stats: dict, G_ema) -> None:
        if not self.info.is_main:
            return
        rec = {"step": step, "kimg": cur_nimg / 1000, "sec": round(time.time() - self.t0, 3), **stats}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(k, v, cur_nimg)
        if self.bar is not None:
            self.bar.update(self.cfg.batch / 1000)
            self.bar.set_postfix_str(" ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in stats.items()))
        if cur_nimg >= self.next_image or cur_nimg >= self.total:
            self.next_image += int(self.cfg.image_every_kimg * 1000)
            self.image_grid(G_ema, cur_nimg)

    @torch.no_grad()
    def image_grid(self, G_ema, cur_nimg: int) -> None:
        """Fixed seeds x fixed prompts, each from three yaws."""
        from dreamportrait.cameras import camera_label
        from dreamportrait.grid import save_grid
        device = next(G_ema.parameters()).device
        prompts = list(self.cfg.eval_prompts) or [None]
        if self.text_encoder is None:
            prompts = [None]
        rows = []
        for prompt in prompts:
            z = torch.randn(2, G_ema.config.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
            c_cond = G_ema.conditioning_label(2, device)
            cond = {}
            if prompt is not None:
                cond["text"] = self.text_encoder([prompt] * 2).to(device)
            ws = G_ema.mapping(z, c_cond, truncation_psi=0.7, **cond)
            planes = G_ema.synthesize_planes(ws, noise_mode="const", **cond)
            for yaw in (-30.0, 0.0, 30.0):
                img = G_ema.render(planes, ws, camera_label(yaw, 0.0).repeat(2, 1).to(device), deterministic=True)
                rows.append(img["image"])
        grid = torch.cat(rows)
        path = self.run_dir / "images" / f"{self.stage}-{cur_nimg // 1000:06d}k{cur_nimg % 1000:03d}.png"
        save_grid(grid, path, ncol=6)
        if self.tb is not None:
            self.tb.add_images("samples", (grid.clamp(-1, 1) + 1) / 2, cur_nimg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
