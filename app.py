"""DreamPortrait web app (Gradio): page layout and event wiring only.

    python app.py [--checkpoint PATH] [--device cpu|cuda] [--host 127.0.0.1] [--port 7860] [--share]

All work goes through :class:`dreamportrait.app_logic.AppBackend` (one shared pipeline per
process); this file turns its input errors into ``gr.Error`` pop-ups and its warnings into
``gr.Warning``. The same file runs as a Hugging Face Space. Nothing is fetched from the network:
analytics are off and the model comes from disk.

ZeroGPU is not supported: each visitor's cached tri-planes live in this process between requests,
and ZeroGPU runs ``@spaces.GPU`` functions in forked workers whose memory is discarded, so a camera
re-render could not find its planes. On Spaces use CPU or a dedicated GPU.
"""
from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported

import argparse  # noqa: E402
import sys  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from dreamportrait.app_logic import (  # noqa: E402
    MAX_MIX_PROMPTS, MESH_MIN_RESOLUTION, PITCH_LIMIT, STRIP_STEPS, VIDEO_FRAMES, YAW_LIMIT, AppBackend,
    InputError, StartupError, describe_model, load_pipeline, read_example_prompts,
)
from dreamportrait.mesh import DEFAULT_THRESHOLD  # noqa: E402
from dreamportrait.pipeline import MAX_SEED  # noqa: E402

CSS = "#portrait img, .strip img { image-rendering: pixelated; }"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python app.py", description="DreamPortrait web app (Gradio).")
    ap.add_argument("--checkpoint", default=None,
                    help="generator.safetensors or its folder (default: checkpoints/default/, else the first "
                         "folder under checkpoints/ holding a generator.safetensors)")
    ap.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    ap.add_argument("--host", default=None,
                    help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for all)")
    ap.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of the server process (default: torch's choice, one per core)")
    ap.add_argument("--concurrency", type=int, default=2,
                    help="requests of one kind (e.g. generate) worked on at once (default 2)")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="requests allowed to wait; more are refused with 'queue is full' (default 64)")
    ap.add_argument("--max-sessions", type=int, default=32,
                    help="visitors whose portrait stays in memory; the least recently used is dropped (default 32)")
    ap.add_argument("--max-mesh-resolution", type=int, default=256,
                    help="cap on the mesh grid, points per side (default 256)")
    return ap.parse_args(argv)


def build_demo(backend: AppBackend, examples: list[str]) -> gr.Blocks:
    """The page: Portrait (generate + camera orbit), Prompt mixing, Style interpolation, 3D mesh."""

    def call(method, *args):
        try:
            return method(*args)
        except InputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    def generate(prompt, seed, psi, yaw, pitch, request: gr.Request):
        return call(backend.generate, request.session_hash, prompt, seed, psi, yaw, pitch)

    def render(yaw, pitch, request: gr.Request):
        return call(backend.render, request.session_hash, yaw, pitch)

    def orbit(num_frames, request: gr.Request, progress=gr.Progress()):
        return call(backend.orbit_video, request.session_hash, num_frames, progress)

    def mix(prompts, seed, psi, yaw, pitch):
        return call(backend.mix, prompts, seed, psi, yaw, pitch)

    def blend(prompt_a, prompt_b, t, seed, psi, yaw, pitch):
        return call(backend.blend, prompt_a, prompt_b, t, seed, psi, yaw, pitch)

    def interpolate(seed_a, seed_b, t, yaw, pitch, request: gr.Request):
        return call(backend.interpolate, request.session_hash, seed_a, seed_b, t, yaw, pitch)

    def interpolation_strip(seed_a, seed_b, steps, yaw, pitch, request: gr.Request):
        return call(backend.interpolation_strip, request.session_hash, seed_a, seed_b, steps, yaw, pitch)

    def interpolation_video(seed_a, seed_b, num_frames, yaw, pitch, request: gr.Request, progress=gr.Progress()):
        return call(backend.interpolation_video, request.session_hash, seed_a, seed_b, num_frames, yaw, pitch,
                    progress)

    def mesh(resolution, threshold, request: gr.Request, progress=gr.Progress()):
        return call(backend.mesh, request.session_hash, resolution, threshold, progress)

    def close(request: gr.Request):
        backend.close_session(request.session_hash)

    first = examples[0] if examples else "A young woman with long blond hair and blue eyes."
    with gr.Blocks(title="DreamPortrait", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown("# DreamPortrait\nText-guided 3D-aware portraits: type a description, then turn the head "
                    "with the camera sliders (re-rendered from the cached tri-planes).")
        gr.Markdown(describe_model(backend.pipeline), elem_id="model-info")
        with gr.Tab("Portrait"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(first, label="Prompt", lines=2, max_lines=6, elem_id="prompt")
                    if examples:
                        gr.Examples([[p] for p in examples], inputs=[prompt], label="Example prompts")
                    with gr.Row():
                        seed = gr.Textbox("0", label=f"Seed (0 – {MAX_SEED})", elem_id="seed", scale=3)
                        random_seed = gr.Button("Random seed", scale=1)
                    psi = gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Truncation ψ",
                                    info="lower: more typical faces; higher: more variety")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=3):
                    image = gr.Image(label="Portrait", format="png", interactive=False, elem_id="portrait",
                                     height=512)
                    caption = gr.Markdown(elem_id="caption")
                    yaw = gr.Slider(-YAW_LIMIT, YAW_LIMIT, value=0.0, step=1.0, label="Yaw (°)", elem_id="yaw")
                    pitch = gr.Slider(-PITCH_LIMIT, PITCH_LIMIT, value=0.0, step=1.0, label="Pitch (°)",
                                      elem_id="pitch")
                    with gr.Row():
                        orbit_frames = gr.Slider(*VIDEO_FRAMES, value=60, step=1, label="Orbit video frames")
                        orbit_button = gr.Button("Orbit video")
                    orbit_video = gr.Video(label="Orbit video (EG3D's orbit ellipse)", interactive=False)
            with gr.Accordion("Depth and raw neural render", open=False):
                with gr.Row():
                    depth = gr.Image(label="Depth (near = bright)", format="png", interactive=False)
                    raw = gr.Image(label="Raw neural render (before super-resolution)", format="png",
                                   interactive=False)
        with gr.Tab("Prompt mixing"):
            gr.Markdown("Each line adds detail; every prompt is rendered with the seed, ψ and camera of the "
                        f"Portrait tab (at most {MAX_MIX_PROMPTS} lines).")
            mix_prompts = gr.Textbox("This is a woman.\nThis is a middle-aged woman.\n"
                                     "This is a middle-aged woman with short red hair.",
                                     lines=4, label="Prompts, one per line")
            mix_button = gr.Button("Render strip", variant="primary")
            mix_strip = gr.Image(label="Prompt strip", format="png", interactive=False, elem_classes="strip")
            mix_caption = gr.Markdown()
            gr.Markdown("**Blend** two prompts (their text encodings are interpolated, global and per token).")
            with gr.Row():
                prompt_a = gr.Textbox(first, label="Prompt A")
                prompt_b = gr.Textbox(examples[1] if len(examples) > 1 else "An old man with a full gray beard.",
                                      label="Prompt B")
            blend_t = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Blend A → B")
            blend_button = gr.Button("Blend")
            blend_image = gr.Image(label="Blend", format="png", interactive=False, elem_classes="strip")
            blend_caption = gr.Markdown()
        with gr.Tab("Style interpolation"):
            gr.Markdown("Interpolates the style latent between two seeds with the current portrait's prompt fixed "
                        "(generate a portrait first); camera from the Portrait tab.")
            with gr.Row():
                seed_a = gr.Textbox("0", label="Seed A")
                seed_b = gr.Textbox("1", label="Seed B")
            interp_t = gr.Slider(0.0, 1.0, value=0.5, step=0.02, label="Seed A → seed B")
            interp_image = gr.Image(label="Interpolated", format="png", interactive=False, elem_classes="strip")
            interp_caption = gr.Markdown()
            with gr.Row():
                interp_steps = gr.Slider(*STRIP_STEPS, value=5, step=1, label="Strip steps")
                strip_button = gr.Button("Render strip")
            interp_strip = gr.Image(label="Interpolation strip", format="png", interactive=False,
                                    elem_classes="strip")
            with gr.Row():
                interp_frames = gr.Slider(*VIDEO_FRAMES, value=48, step=1, label="Video frames")
                interp_video_button = gr.Button("Export video")
            interp_video = gr.Video(label="Interpolation video", interactive=False)
        with gr.Tab("3D mesh"):
            gr.Markdown("Marching cubes on the current portrait's density, with vertex colours. Larger grids take "
                        f"longer (capped at {backend.max_mesh_resolution} points per side).")
            with gr.Row():
                mesh_resolution = gr.Slider(MESH_MIN_RESOLUTION, backend.max_mesh_resolution,
                                            value=min(128, backend.max_mesh_resolution), step=16,
                                            label="Grid resolution (points per side)")
                threshold = gr.Number(DEFAULT_THRESHOLD, label="Density threshold (EG3D: 10)")
            mesh_button = gr.Button("Extract mesh", variant="primary")
            mesh_view = gr.Model3D(label="Mesh (.glb)", height=480)
            mesh_files = gr.File(label="Download .obj / .ply / .glb", file_count="multiple", interactive=False)
            mesh_caption = gr.Markdown()

        views = [image, depth, raw, caption]
        camera = [yaw, pitch]
        gr.on([generate_button.click, prompt.submit], generate, [prompt, seed, psi, *camera], views,
              api_name="generate")
        random_seed.click(backend.random_seed, None, seed, api_name="random_seed")
        gr.on([yaw.input, pitch.input], render, camera, views, api_name="render", trigger_mode="always_last",
              show_progress="hidden")
        orbit_button.click(orbit, orbit_frames, orbit_video, api_name="orbit_video")
        mix_button.click(mix, [mix_prompts, seed, psi, *camera], [mix_strip, mix_caption], api_name="mix")
        gr.on([blend_button.click, blend_t.input], blend, [prompt_a, prompt_b, blend_t, seed, psi, *camera],
              [blend_image, blend_caption], api_name="blend", trigger_mode="always_last")
        interp_inputs = [seed_a, seed_b]
        interp_t.input(interpolate, [*interp_inputs, interp_t, *camera], [interp_image, interp_caption],
                       api_name="interpolate", trigger_mode="always_last")
        strip_button.click(interpolation_strip, [*interp_inputs, interp_steps, *camera], interp_strip,
                           api_name="interpolation_strip")
        interp_video_button.click(interpolation_video, [*interp_inputs, interp_frames, *camera], interp_video,
                                  api_name="interpolation_video")
        mesh_button.click(mesh, [mesh_resolution, threshold], [mesh_view, mesh_files, mesh_caption], api_name="mesh")
        demo.unload(close)
    return demo


def main(argv=None) -> int:
    args = parse_args(argv)
    for flag in ("threads", "concurrency", "max_queue", "max_sessions"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pipeline = load_pipeline(args.checkpoint, args.device)
        backend = AppBackend(pipeline, warn=gr.Warning, max_sessions=args.max_sessions,
                             max_mesh_resolution=args.max_mesh_resolution)
    except (StartupError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = build_demo(backend, read_example_prompts())
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False, css=CSS,
                allowed_paths=[str(backend.work_dir)], footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
