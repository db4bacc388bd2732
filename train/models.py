"""The models of a stage: built and checked against each other and the data before any training
work starts, and exported as the files the next stage, the app and evaluation load.

- the generator: a plain EG3D generator (``prior``), made text-conditioned for ``stage1`` and
  ``stage2`` (or loaded so from the ``init`` run folder);
- the dual discriminator (from the ``init`` folder when it has one, else fresh), given the text
  projection when the stage asks for it (``STAGE.text_discriminator``, an extension);
- the frozen text encoder the generator reads (stages 1 and 2);
- the guidance (stage 2: distribution SDS from the diffusion teacher, or one of two extensions,
  ``guidance=variational_sds`` or ``guidance=classifier_score``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dreamportrait.checkpoints import DISCRIMINATOR_FILE, GENERATOR_FILE, CheckpointError, read_model_metadata
from dreamportrait.discriminator import DiscriminatorConfig, DualDiscriminator
from dreamportrait.generator import GeneratorConfig, TriPlaneGenerator, preset
from dreamportrait.text_encoder import TextEncoder
from dreamportrait.text_generator import DreamPortraitGenerator
from train.config import GUIDANCES, TextConfig, TrainConfig
from train.guidance import Guidance


@dataclass
class Models:
    G: TriPlaneGenerator
    D: DualDiscriminator
    text_encoder: TextEncoder | None
    guidance: Guidance | None
    init_kimg_total: float = 0.0     # images the init generator had seen over all its stages


def build_text_encoder(text: TextConfig) -> TextEncoder:
    if text.sd_pipeline:
        return TextEncoder.from_sd_pipeline(text.sd_pipeline)
    if text.open_clip_config:
        return TextEncoder.from_config(text.open_clip_config, seed=text.seed)
    if text.open_clip_folder:
        return TextEncoder.from_clip_folder(text.open_clip_folder)
    if text.open_clip_model:
        return TextEncoder.from_open_clip(text.open_clip_model, text.open_clip_pretrained)
    if text.minilm:
        return TextEncoder.from_minilm(text.minilm)
    raise ValueError("stage1/stage2 need a text encoder: set text.open_clip_model (+ open_clip_pretrained), "
                     "text.open_clip_config, text.open_clip_folder, text.sd_pipeline or text.minilm")


def init_folder(cfg: TrainConfig, stage: str) -> Path | None:
    """The run folder a stage starts from (``STAGE.init``), or None for a fresh generator."""
    init = cfg.stage(stage).init
    if not init:
        return None
    folder = Path(init)
    if not (folder / GENERATOR_FILE).is_file():
        raise FileNotFoundError(
            f"{stage}.init={init!r}: no {GENERATOR_FILE} there; init is a run folder (the previous stage's, e.g. "
            f"runs/PRESET/prior, or EG3D weights converted with `python -m dreamportrait.eg3d.convert`), not a "
            "model file; run the previous stage first")
    return folder


def generator_config(spec: str | dict) -> GeneratorConfig:
    return preset(spec) if isinstance(spec, str) else GeneratorConfig.from_dict(spec)


def _text_generator(G: TriPlaneGenerator, cfg: TrainConfig, text_encoder: TextEncoder, where: str):
    """G as a text-conditioned generator whose text parts are what ``cfg.text.condition`` says."""
    want = cfg.text.condition
    if want.text_dim != text_encoder.width:
        raise ValueError(f"text.condition.text_dim={want.text_dim} but the text encoder gives "
                         f"{text_encoder.width}-wide features; set text.condition.text_dim={text_encoder.width}")
    if not isinstance(G, DreamPortraitGenerator):
        return DreamPortraitGenerator.from_eg3d(G, want)
    if G.text_config.to_dict() != want.to_dict():
        raise CheckpointError(f"{where} holds text parts {G.text_config.to_dict()} but text.condition is "
                              f"{want.to_dict()}; set text.condition to the checkpoint's")
    return G


def _text_discriminator(D: DualDiscriminator, want: bool, text_encoder: TextEncoder | None, stage: str,
                        where: str) -> DualDiscriminator:
    """D as ``STAGE.text_discriminator`` asks: a text-blind D gains a zero-initialised text
    projection (so it judges as before until trained); a text-reading D must be asked for."""
    width = D.config.text_dim
    if width and not want:
        raise CheckpointError(f"{where} reads text (text_dim={width}); continue with {stage}.text_discriminator=true, "
                              "or start from a text-blind discriminator")
    if not want:
        return D
    if width:
        if width != text_encoder.width:
            raise CheckpointError(f"{where} reads {width}-wide sentence features but the text encoder gives "
                                  f"{text_encoder.width}")
        return D
    grown = DualDiscriminator(dataclasses.replace(D.config, text_dim=text_encoder.width))
    missing, unexpected = grown.load_state_dict(D.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("text_mapping.") for k in missing), (missing, unexpected)
    return grown


def build_guidance(cfg: TrainConfig, teacher_folder: Path, device: torch.device,
                   average_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None) -> Guidance:
    """Stage 2's guidance from the teacher folder (``average_gradients``: across ranks, for a
    guidance that trains a network of its own)."""
    from train.teacher import DiffusionTeacher
    teacher = DiffusionTeacher.from_pretrained(teacher_folder, device=device)
    if cfg.guidance == "distribution_sds":
        from train.distribution_sds import DistributionSDS
        return DistributionSDS(teacher, cfg.sds)
    if cfg.guidance == "classifier_score":
        from train.classifier_score import ClassifierScoreDistillation
        return ClassifierScoreDistillation(teacher, cfg.sds, cfg.csd)
    from train.variational_sds import VariationalSDS
    return VariationalSDS(teacher, cfg.sds, cfg.vsd, average_gradients=average_gradients)


def build_models(cfg: TrainConfig, stage: str, device: torch.device, data_resolution: int,
                 average_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None) -> Models:
    """Validate the inputs of ``stage`` (init folder, text encoder, teacher) and build its models
    (``average_gradients``: what a guidance that trains its own network averages its gradients with)."""
    if cfg.guidance not in GUIDANCES:
        raise ValueError(f"guidance={cfg.guidance!r} unknown; choose one of {GUIDANCES}")
    teacher_folder = None
    if stage == "stage2":
        from train.teacher import check_teacher_folder, resolve_teacher_folder
        if not cfg.teacher:
            raise ValueError("stage2 needs a diffusion teacher: set teacher=FOLDER (a Stable-Diffusion-style folder)")
        teacher_folder = resolve_teacher_folder(cfg.teacher)
        check_teacher_folder(teacher_folder)
    folder = init_folder(cfg, stage)
    if folder is None and stage == "stage2":
        raise ValueError("stage2 must start from a stage1 run folder: set stage2.init")
    text_encoder = build_text_encoder(cfg.text).to(device) if stage != "prior" else None
    init_kimg_total, D = 0.0, None
    if folder is not None:
        meta = read_model_metadata(folder / GENERATOR_FILE)
        init_kimg_total = float(meta.extra.get("kimg_total", meta.extra.get("kimg", 0.0)))
        cls = DreamPortraitGenerator if meta.kind == DreamPortraitGenerator.KIND else TriPlaneGenerator
        G = cls.from_pretrained(folder / GENERATOR_FILE)
        if text_encoder is not None and cls is DreamPortraitGenerator:
            text_encoder.check_matches(meta.extra.get("text_encoder"), str(folder / GENERATOR_FILE))
        if (folder / DISCRIMINATOR_FILE).is_file():
            D = DualDiscriminator.from_pretrained(folder / DISCRIMINATOR_FILE)
    else:
        G = TriPlaneGenerator(generator_config(cfg.generator))
    if text_encoder is not None:
        G = _text_generator(G, cfg, text_encoder, str(folder / GENERATOR_FILE) if folder else "the generator")
    if D is None:
        c = G.config
        D = DualDiscriminator(DiscriminatorConfig(img_resolution=c.img_resolution, channel_base=c.channel_base,
                                                  channel_max=c.channel_max))
    D = _text_discriminator(D, cfg.stage(stage).text_discriminator, text_encoder, stage,
                            str(folder / DISCRIMINATOR_FILE) if folder else "the discriminator")
    if D.config.img_resolution != G.config.img_resolution:
        raise CheckpointError(f"discriminator resolution {D.config.img_resolution} != generator "
                              f"{G.config.img_resolution}")
    if data_resolution != G.config.img_resolution:
        raise ValueError(f"data set images are {data_resolution}x{data_resolution} but the generator outputs "
                         f"{G.config.img_resolution}; write the data set at the generator's resolution")
    guidance = None
    if stage == "stage2":
        guidance = build_guidance(cfg, teacher_folder, device, average_gradients)
    return Models(G.to(device).train(), D.to(device).train(), text_encoder, guidance, init_kimg_total)


def export(run_dir: Path, G_ema, D, text_encoder: TextEncoder | None, cfg: TrainConfig, stage: str, nimg: int,
           init_kimg_total: float) -> None:
    """Write the generator (EMA weights; its config holds the neural rendering resolution it was
    trained at) and the discriminator. ``kimg`` counts this stage's images, ``kimg_total`` all
    stages' since initialisation."""
    extra = {"stage": stage, "kimg": nimg / 1000, "kimg_total": init_kimg_total + nimg / 1000,
             "train_preset": cfg.preset, "data": cfg.data}
    if text_encoder is not None:
        extra["text_encoder"] = text_encoder.describe()
    G_ema.save_pretrained(run_dir / GENERATOR_FILE, extra=extra)
    D.save_pretrained(run_dir / DISCRIMINATOR_FILE)
