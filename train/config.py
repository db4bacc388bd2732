"""Training configuration: one dataclass tree, named presets, and ``key=value`` overrides.

Stages: ``paired`` (synthetic world only, optional) warm-starts the prior's generator by
supervising G(z) with the world's renders of head(z); ``prior`` trains a plain EG3D generator with the GAN loss (needed in the synthetic
world; paper-scale users start from EG3D's released weights through the converter);
``stage1`` adds the text path and trains with the GAN loss only, so the zero-initialised
adapters and the semantics mapping settle into the pretrained generator; ``stage2`` adds
distribution SDS from a frozen diffusion teacher, regularised by the GAN loss.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from dreamportrait.text_generator import TextConditionConfig
from train.classifier_score import ClassifierScoreConfig
from train.distribution_sds import DistributionSDSConfig
from train.gan_loss import GANLossConfig
from train.variational_sds import VariationalSDSConfig

STAGES = ("paired", "prior", "stage1", "stage2")
GUIDANCES = ("distribution_sds", "variational_sds", "classifier_score")  # stage 2's: the paper's, and two extensions


@dataclass
class OptimConfig:
    g_lr: float = 0.0025
    d_lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    eps: float = 1e-8
    g_reg_interval: int = 4
    d_reg_interval: int = 16
    ema_kimg: float = 10.0            # half-life in thousands of images, at batch 32 (scaled with batch)
    ema_rampup: float | None = 0.05


@dataclass
class TextConfig:
    """Which frozen text encoder the generator reads (see dreamportrait.text_encoder), and how
    text enters the generator (the library's own config; ``condition.text_dim`` must be the
    encoder's width, checked when training starts)."""
    open_clip_model: str | None = None          # e.g. 'ViT-H-14'
    open_clip_pretrained: str | None = None     # e.g. 'laion2b_s32b_b79k' (from the open_clip cache) or a file
    open_clip_config: dict | None = None        # a small text config built with open_clip's classes
    open_clip_folder: str | None = None         # an open_clip model folder (the synthetic world's small CLIP)
    sd_pipeline: str | None = None              # or the text_encoder of a Stable-Diffusion-style folder
    minilm: str | None = None                   # or 'sentence-transformers/all-MiniLM-L6-v2' (pip package) or its folder
    seed: int = 0                               # initialisation seed of a config-built encoder
    condition: TextConditionConfig = field(default_factory=TextConditionConfig)


@dataclass
class StageConfig:
    kimg: float = 10.0                          # images to train in this stage, in thousands
    init: str | None = None                     # run folder to start from: the previous stage's, or converted EG3D
    freeze_G: bool = False
    freeze_D: bool = False
    grad_accum: int = 1                         # micro-batches per optimiser step
    gan_weight: float = 1.0                     # weight of the GAN term in G's objective (next to the guidance)
    mode_seeking_weight: float = 0.0            # extension, not the paper's: MSGAN's term on pairs of z (train/loop.py)
    text_discriminator: bool = False            # extension, not the paper's: D also reads the sentence feature
                                                # (projection, dreamportrait/discriminator.py; stage1/stage2)
    latent_prompt_mentions: int = 0             # extension for the synthetic world, not the paper's: the guidance
                                                # reads each caption completed from its z to this many attributes
                                                # (train/sampling.py Fakes.completed_captions); 0: off
    world_depth_weight: float = 0.0             # extension for the synthetic world, not the paper's: L1 between
                                                # G's depth and the world's head for the caption completed from z
                                                # (train/loop.py world_depth_loss); 0: off
    world_colour_weight: float = 0.0            # extension for the synthetic world, not the paper's: L1 between
                                                # G's images (final and raw) and the world's render of that head
                                                # (train/loop.py image_l1); 0: off
    latent_prompt_share: float = 1.0            # with latent_prompt_mentions: the share of fakes whose caption is
                                                # completed (a draw seeded by z); the others keep it as written
    mapping_full_rate: bool = False             # extension, not the paper's: the mapping layers (z's and the
                                                # semantics mapping's) learn at G's lr, not EG3D's lr x 0.01
                                                # (train/loop.py param_groups)


@dataclass
class PairedConfig(StageConfig):
    """The paired warm start (train/paired.py): G(z) reproduces the synthetic world's head(z)."""
    lr: float = 0.002
    betas: tuple = (0.9, 0.99)                  # converged faster than EG3D's (0, 0.99) in a prototype
    raw_weight: float = 1.0                     # weight of the L1 on the neural-rendering-resolution image
    mapping_full_rate: bool = True              # the mapping learns at lr, not at EG3D's lr x 0.01 (see paired.py)
    workers: int = 1                            # processes rendering the world's targets (0: the training one)


@dataclass
class TrainConfig:
    preset: str = "custom"
    data: str = ""                              # EG3D-format data set (folder or zip) with captions.json
    generator: str | dict = "tiny"              # preset name or GeneratorConfig dict (a stage without init)
    batch: int = 8                              # global batch (all ranks, one optimiser step)
    seed: int = 0
    device: str = "auto"
    bf16: bool = False                          # bf16 autocast for G/D forward passes (the teacher keeps its own)
    gan: GANLossConfig = field(default_factory=GANLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sds: DistributionSDSConfig = field(default_factory=DistributionSDSConfig)
    guidance: str = "distribution_sds"          # or 'variational_sds' (its particle: vsd.*), 'classifier_score' (csd.*) (extensions)
    vsd: VariationalSDSConfig = field(default_factory=VariationalSDSConfig)
    csd: ClassifierScoreConfig = field(default_factory=ClassifierScoreConfig)
    teacher: str | None = None                  # Stable-Diffusion-style pipeline folder (stage2)
    paired: PairedConfig = field(default_factory=PairedConfig)
    prior: StageConfig = field(default_factory=StageConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    snapshot_every_kimg: float = 1.0
    image_every_kimg: float = 1.0
    eval_prompts: tuple = ()

    def stage(self, name: str) -> StageConfig:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose one of {STAGES}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        default = getattr(cls(), k) if _constructible(cls) else None
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = _from_dict(type(default), v)
        elif isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)


def _constructible(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``dotted.key=value`` overrides; values parse as JSON, else as strings."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. batch=16 or stage2.kimg=2)")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {key!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {key!r}: unknown key {parts[-1]!r}; known: {sorted(node)}")
        node[parts[-1]] = value
    return TrainConfig.from_dict(d)


TEXT_SOURCES = ("open_clip_model", "open_clip_config", "open_clip_folder", "sd_pipeline", "minilm")

PRESETS: dict[str, TrainConfig] = {
    # CPU, minutes per thousand images: the synthetic portrait world at 64x64.
    "synthetic-tiny": TrainConfig(
        preset="synthetic-tiny", data="data/synthetic-64", generator="tiny", batch=8, bf16=False,
        gan=GANLossConfig(r1_gamma=1.0, blur_init_sigma=2.0, blur_fade_kimg=2.0, gpc_reg_prob=0.5,
                          gpc_reg_fade_kimg=5.0),
        optim=OptimConfig(g_lr=0.0025, d_lr=0.002, ema_kimg=1.0, ema_rampup=0.05),
        # The generator reads the pretrained all-MiniLM-L6-v2 (sha256-checked, from its pip package).
        text=TextConfig(minilm="sentence-transformers/all-MiniLM-L6-v2",
                        condition=TextConditionConfig(text_dim=384, adapter_resolutions=(4, 8, 16, 32, 64))),
        sds=DistributionSDSConfig(guidance_scale=7.5),  # the small teacher's best scale (world/RESULTS.md, §3)
        teacher="checkpoints/synthetic-teacher",
        paired=PairedConfig(kimg=0.4), prior=StageConfig(kimg=0.4),
        stage1=StageConfig(kimg=0.3, init="runs/synthetic-tiny/prior"),
        stage2=StageConfig(kimg=0.3, init="runs/synthetic-tiny/stage1", grad_accum=1),
        snapshot_every_kimg=0.1, image_every_kimg=0.1,
        eval_prompts=("A young woman with long blond hair.", "An old man with a full beard and glasses.")),
    # The paper: CelebAText-HQ at 512, EG3D FFHQ 512 weights, OpenCLIP ViT-H/14, SD 2.0-base, 8 GPUs.
    "celebatext-512": TrainConfig(
        preset="celebatext-512", data="data/celebatext-hq-512.zip", generator="eg3d-ffhq-512", batch=32,
        gan=GANLossConfig(r1_gamma=1.0, blur_init_sigma=0.0, gpc_reg_prob=0.5, gpc_reg_fade_kimg=0.0),
        optim=OptimConfig(),
        text=TextConfig(open_clip_model="ViT-H-14", open_clip_pretrained="laion2b_s32b_b79k",
                        condition=TextConditionConfig(text_dim=1024)),
        sds=DistributionSDSConfig(guidance_scale=100.0),
        teacher="stabilityai/stable-diffusion-2-base",
        paired=PairedConfig(kimg=0.0), prior=StageConfig(kimg=0.0),
        stage1=StageConfig(kimg=500.0, init="checkpoints/eg3d-ffhq512-128"),
        stage2=StageConfig(kimg=1000.0, init="runs/celebatext-512/stage1", grad_accum=2),
        snapshot_every_kimg=50.0, image_every_kimg=20.0,
        eval_prompts=("A woman is smiling with her teeth showing.", "This man has a beard and wears glasses.")),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig.from_dict(PRESETS[name].to_dict())


def validate(cfg: TrainConfig, stage: str) -> None:
    """Check a config for ``stage`` without touching files (those are checked when training starts)."""
    from dreamportrait.generator import GeneratorConfig, preset as generator_preset
    from train.distribution_sds import WEIGHTINGS
    st = cfg.stage(stage)
    if cfg.guidance not in GUIDANCES:
        raise ValueError(f"guidance={cfg.guidance!r} unknown; choose one of {GUIDANCES}")
    if isinstance(cfg.generator, str):
        generator_preset(cfg.generator)
    else:
        GeneratorConfig.from_dict(cfg.generator)
    if cfg.batch <= 0 or st.grad_accum <= 0 or cfg.batch % st.grad_accum:
        raise ValueError(f"batch {cfg.batch} must be a positive multiple of {stage}.grad_accum {st.grad_accum}")
    if st.kimg < 0:
        raise ValueError(f"{stage}.kimg must be >= 0")
    if st.freeze_G and st.freeze_D:
        raise ValueError(f"{stage}: freezing both G and D leaves nothing to train")
    if st.gan_weight < 0:
        raise ValueError(f"{stage}.gan_weight={st.gan_weight} must be >= 0")
    if st.mode_seeking_weight < 0:
        raise ValueError(f"{stage}.mode_seeking_weight={st.mode_seeking_weight} must be >= 0")
    if st.gan_weight == 0 and stage != "stage2":
        raise ValueError(f"{stage}.gan_weight=0 leaves G without an objective (only stage2 has another term, "
                         "distribution SDS); keep the GAN term in this stage")
    if st.latent_prompt_mentions < 0:
        raise ValueError(f"{stage}.latent_prompt_mentions={st.latent_prompt_mentions} must be >= 0 (0: off)")
    for name in ("world_depth_weight", "world_colour_weight"):
        if getattr(st, name) < 0:
            raise ValueError(f"{stage}.{name}={getattr(st, name)} must be >= 0 (0: off)")
    if not 0 <= st.latent_prompt_share <= 1:
        raise ValueError(f"{stage}.latent_prompt_share={st.latent_prompt_share} must be in [0, 1] "
                         "(the share of fakes whose caption is completed)")
    if st.latent_prompt_share != 1 and not st.latent_prompt_mentions:
        raise ValueError(f"{stage}.latent_prompt_share={st.latent_prompt_share} needs "
                         f"{stage}.latent_prompt_mentions > 0 (the number of attributes to complete to)")
    if st.latent_prompt_mentions and stage != "stage2":
        raise ValueError(f"{stage}.latent_prompt_mentions: only stage2 has a guidance to read completed captions")
    if st.text_discriminator and stage not in ("stage1", "stage2"):
        raise ValueError(f"{stage}.text_discriminator: only stage1 and stage2 have text for the discriminator "
                         "to read")
    sources = [k for k in TEXT_SOURCES if getattr(cfg.text, k)]
    if stage in ("stage1", "stage2") and not sources:
        raise ValueError(f"{stage} needs a text encoder: set one of " + ", ".join(f"text.{k}" for k in TEXT_SOURCES))
    if len(sources) > 1:
        raise ValueError(f"several text encoders are set ({', '.join('text.' + k for k in sources)}); "
                         "set the others to null")
    if stage == "stage2":
        if not cfg.teacher:
            raise ValueError("stage2 needs teacher=FOLDER (a Stable-Diffusion-style pipeline folder)")
        if not st.init:
            raise ValueError("stage2 must start from a stage1 checkpoint: set stage2.init")
        if cfg.sds.weighting not in WEIGHTINGS:
            raise ValueError(f"sds.weighting must be one of {sorted(WEIGHTINGS)}")
    final = cfg.gan.neural_rendering_resolution_final
    if final is not None and final < 4:
        raise ValueError(f"gan.neural_rendering_resolution_final={final} must be >= 4 (or null: the generator's own)")
