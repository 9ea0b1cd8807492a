"""Interactive 4D prompt viewer: where and when does "the prompt" happen, from any viewpoint.

A local web viewer (viser): the server renders the scene with the project's rasterizer (CUDA where
built, the PyTorch reference on the CPU) and the browser shows the images. Free camera (orbit,
fly) with the train and test cameras as presets; a time slider with play/pause, loop and speed;
the render's resolution. Type a prompt: its relevancy heatmap is drawn over the render from the
current viewpoint at the current timestep, and its timeline (per-timestep score and detected
spans, computed exactly as visualize_4legs.py computes them, from the views of --cams) is plotted
in the panel, with a button per span that jumps there. Several prompts, each with a colour, each
shown or hidden; views blend / heatmap / RGB / foreground only. "Export" writes the current view's
video and timeline as visualize_4legs.py would, under results/<exp>/<seq>/viewer-<time>/.

    python viewer.py -s data/synthetic -e demo --encoder color      # then open http://localhost:8080

Stage 1 is enough to look around; prompts need stages 4 and 5 (the panel says what to run).
Every browser keeps its own camera, time and prompts; prompts' text encodings and timelines are
computed once per viewer.
"""

import argparse
import contextlib
import math
import os
import threading
import time
import traceback

import numpy as np
import torch

import helpers
from feature_extraction.cache import add_cache_dir_option
from feature_extraction.relevancy import (
    DETECT_THRESHOLD,
    ENCODER_OF_STAGES,
    Stages,
    add_prompt_options,
    check_prompt_options,
    d3dgs_params_path,
    detect_spans,
    encode_prompts,
    frame_scores,
    prompt_dir,
    relevance_map,
    render_features,
)

VIEW_MODES = ("blend", "heatmap", "RGB", "foreground only")
JPEG_QUALITY = 90
IDLE_WAIT_S = 0.5  # a paused viewer's render thread looks this often whether its browser has gone
PLAY_WAIT_S = 1 / 120  # and a playing one this often whether the next timestep is due
# The PyTorch path at the demo's size (14k Gaussians), 2 cores: one prompt's blend 4.4 frames/s at
# 160x90, 1.2 at 320x180 (the decoder is most of it); the user raises it with the slider.
CPU_HEIGHT = 90


# ---------------------------------------------------------------- the scene


def load_scene(seq_dir, exp, encoder_spec, device, cache_root=None):
    """Stage 1's Gaussians of every timestep, on `device`, and what the viewer needs around them.

    Returns a dict: frames [T] of load_d3dgs_params's rendervars, env_map (load_env_map's), presets
    {name: (w, h, k [3, 3], w2c [4, 4])} of the train and test cameras at timestep 0, center [3] (the
    foreground's mean at timestep 0: what the cameras orbit), and the arguments to find stages 4 and 5 later
    (attach_language). Raises UserError naming stage 1 when its output is missing."""
    params_path = d3dgs_params_path(exp, seq_dir)
    num_t = helpers.read_d3dgs_params(params_path)["means3D"].shape[0]
    frames = [
        helpers.load_d3dgs_params(params_path, t, device)
        for t in helpers.progress(range(num_t), desc="stage-1 Gaussians", leave=False)
    ]
    presets = {}
    for split in ("train", "test"):
        meta = helpers.load_meta(seq_dir, split)
        for c, cam_id in enumerate(meta["cam_id"]):
            presets[f"{split} cam{cam_id}"] = (
                meta["w"],
                meta["h"],
                np.asarray(meta["k"][0][c]),
                np.asarray(meta["w2c"][0][c]),
            )
    fg = helpers.is_foreground(frames[0]["seg_colors"])
    center = frames[0]["means3D"][fg if fg.any() else slice(None)].mean(0).cpu().numpy()
    return {
        "seq_dir": seq_dir,
        "exp": exp,
        "encoder_spec": encoder_spec,
        "cache_root": cache_root,
        "device": device,
        "params_path": params_path,
        "num_t": num_t,
        "frames": frames,
        "env_map": helpers.load_env_map(params_path, device),
        "presets": presets,
        "center": center,
        "stages": None,
    }


def attach_language(scene, cams):
    """Find stages 4 and 5 (autoencoder, lifted features) and put every timestep's legs_features
    [N, 128] into scene["frames"]; also the timeline views: "test", "train" (every camera of that
    split) or "orbit", as visualize_4legs.py --cams. Raises UserError naming the stage to run first."""
    from visualize_4legs import meta_views, orbit_view

    if scene["stages"] is not None:
        return
    stages = Stages(scene["seq_dir"], scene["exp"], scene["encoder_spec"], scene["device"], scene["cache_root"])
    for t, frame in enumerate(helpers.progress(scene["frames"], desc="4-LEGS features", leave=False)):
        frame["legs_features"] = stages.gaussians(t)["legs_features"]
    scene["views"] = (
        orbit_view(scene["seq_dir"], stages, scene["device"])
        if cams == "orbit"
        else meta_views(scene["seq_dir"], cams, stages.num_t, scene["device"])
    )
    scene["stages"] = stages


# ---------------------------------------------------------------- cameras


def viewer_camera(wxyz, position, fov_y, width, height, device="cpu"):
    """Rasterizer settings of a pinhole camera with the browser's pose: wxyz, position [3] of the
    camera-to-world transform (OpenCV frame, as viser reports it), vertical field of view in
    radians, square pixels, principal point at the image centre."""
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = helpers.build_rotation(torch.as_tensor(np.asarray(wxyz, dtype=np.float64))[None])[0]
    c2w[:3, 3] = torch.as_tensor(np.asarray(position, dtype=np.float64))
    focal = height / (2 * math.tan(fov_y / 2))
    k = [[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]]
    return helpers.setup_camera(width, height, k, torch.linalg.inv(c2w).numpy(), device=device)


def preset_pose(preset, center):
    """Where the browser's camera goes for a preset (w, h, k, w2c): position [3], look_at [3] (on
    the optical axis at the depth of `center` [3], so that orbiting turns around the scene), up [3]
    (the camera's own up: no roll lost) and vertical field of view in radians."""
    _, h, k, w2c = preset
    rot, trans = w2c[:3, :3], w2c[:3, 3]
    position = -rot.T @ trans
    forward, down = rot[2], rot[1]
    distance = max(float(forward @ (center - position)), 0.1)
    return position, position + distance * forward, -down, 2 * math.atan(h / (2 * k[1][1]))


def render_size(height, aspect):
    """(width, height) of a render `height` pixels high with the browser's aspect ratio."""
    height = max(int(height), 8)
    return max(round(height * aspect), 8), height


# ---------------------------------------------------------------- one frame


def turbo_table(device):
    """matplotlib's turbo colormap as a table [256, 3] in 0..255 on `device` (float32)."""
    from matplotlib import colormaps

    return torch.tensor(colormaps["turbo"](np.arange(256))[:, :3] * 255, dtype=torch.float32, device=device)


def colour_heat(heat, colours, turbo):
    """Heat [Q, H, W] in [0, 1] -> colour [H, W, 3] in 0..255 (float32). One prompt: the turbo
    colormap, indexed as matplotlib indexes it (visualize_4legs.py's videos). Several: each pixel
    takes the colour [Q, 3] (0..1) of its hottest prompt, scaled by that heat."""
    if heat.shape[0] == 1:
        return turbo[(heat[0] * 256).long().clamp(0, 255)]
    hottest, which = heat.max(0)
    return colours.to(heat.device)[which] * 255 * hottest[..., None]


def compose(mode, colour, rgb):
    """The image of a view mode from the heat's colour [H, W, 3] (0..255) and the render rgb
    [3, H, W] in [0, 1]: uint8 [H, W, 3] on their device. "heatmap": the colour; otherwise the
    colour mixed 50/50 with the render, rounded as overlay() rounds it."""
    if mode == "heatmap":
        return (colour + 0.5).to(torch.uint8)
    rgb8 = (rgb.clamp(0, 1).permute(1, 2, 0) * 255 + 0.5).to(torch.uint8)  # helpers.to_uint8, on the device
    return (0.5 * colour + 0.5 * rgb8 + 0.5).to(torch.uint8)


def render_rgb(cam, frame, env_map=None):
    """Colour render [3, H, W] of one timestep's rendervar, without features, over stage 1's
    environment map (helpers.load_env_map's; None: over black)."""
    gaussians = {k: v for k, v in frame.items() if k != "legs_features"}
    return helpers.render_view(cam, gaussians, env_map)


def render_frame(
    cam, frame, mode, lights, ae=None, negatives=None, turbo=None, threshold=DETECT_THRESHOLD, stride=None, env_map=None
):
    """One image of the viewer: uint8 [H, W, 3] numpy.

    frame: one timestep's rendervar (with legs_features [N, 128] once the lifting stages exist);
    mode: one of VIEW_MODES; lights: the prompts shown, [{"positive": [D] unit, "colour": (r, g, b)
    in [0, 1], "peak": the prompt's peak relevance over its timeline's views}]; ae, negatives [M, D],
    turbo (turbo_table) needed with lights. Heat = relevance / max(peak, threshold), as heat() of a
    whole video. "blend" mixes the heat's colour 50/50 with the render as overlay() does; "foreground
    only" is the blend with the relevance kept on the stage-1 foreground (--fg-only). env_map: stage 1's
    (helpers.load_env_map; None: black), behind the render in every mode."""
    with torch.no_grad():
        if mode == "RGB" or not lights:
            return helpers.to_uint8(render_rgb(cam, frame, env_map))
        background = helpers.view_background(cam, env_map)
        rgb, feats, fg = render_features(cam, frame, frame["legs_features"], mode == "foreground only", background)
        positives = torch.stack([light["positive"] for light in lights])
        relevance = relevance_map(feats, ae, positives, negatives, stride)
        if fg is not None:
            relevance = relevance * (fg > 0.5)
        peaks = torch.tensor([max(light["peak"], threshold) for light in lights], device=relevance.device)
        heat = (relevance / peaks[:, None, None]).clamp(max=1.0)
        colour = colour_heat(heat, torch.tensor([light["colour"] for light in lights]), turbo)
        return compose(mode, colour, rgb).cpu().numpy()


# ---------------------------------------------------------------- a prompt's timeline


def summarise_views(per_view_scores, per_view_peaks, threshold):
    """The timeline of visualize_4legs.py from per-view scores {name: [T]} and peak relevances
    {name: float}: per view its scores (rounded to 5 digits, as timeline.json stores them), spans and
    peak; their mean over the views, whose spans are the prompt's. Returns {"scores": [T], "spans",
    "per_view", "peak": the highest peak}."""
    per_view = {
        name: {
            "scores": [round(float(s), 5) for s in scores],
            "spans": detect_spans(scores, threshold),
            "peak_relevance": round(float(per_view_peaks[name]), 5),
        }
        for name, scores in per_view_scores.items()
    }
    mean = np.mean([view["scores"] for view in per_view.values()], axis=0)
    return {
        "scores": [round(float(s), 5) for s in mean],
        "spans": detect_spans(torch.from_numpy(mean), threshold),
        "per_view": per_view,
        "peak": max(float(p) for p in per_view_peaks.values()),
    }


def prompt_timeline(
    frames,
    views,
    ae,
    positive,
    negatives,
    threshold=DETECT_THRESHOLD,
    stride=None,
    fg_only=False,
    lock=None,
    progress=None,
):
    """A prompt's timeline over every timestep, from the views of visualize_4legs.py.

    frames [T]: rendervars with legs_features; views: [(name, [camera per timestep])]; positive [D]
    unit, negatives [M, D]. Each frame is scored as render_relevance_video + frame_scores do it
    (relevance stored as float16 first), but from the frames already on the device and with the
    scores kept there until the end. lock: held around each timestep, so that other browsers' frames
    interleave; progress(t) after each. Returns summarise_views's dict."""
    scores = torch.zeros(len(views), len(frames), device=positive.device)
    peaks = torch.zeros_like(scores)
    for t, frame in enumerate(frames):
        with lock or contextlib.nullcontext(), torch.no_grad():
            for v, (_, cams) in enumerate(views):
                _, feats, fg = render_features(cams[t], frame, frame["legs_features"], with_fg=fg_only)
                relevance = relevance_map(feats, ae, positive[None], negatives, stride)[0]
                if fg is not None:
                    relevance = relevance * (fg > 0.5)
                relevance = relevance.to(torch.float16)
                scores[v, t] = frame_scores(relevance)
                peaks[v, t] = relevance.max()
        if progress:
            progress(t)
    scores, peaks = scores.cpu(), peaks.cpu()
    names = [name for name, _ in views]
    return summarise_views(dict(zip(names, scores)), dict(zip(names, peaks.max(1).values)), threshold)


def get_prompt(scene, shared, text, args, progress=None):
    """The shared entry of a prompt, made once per viewer: {"text", "positive" [D], "timeline"}.
    Loads the text encoder the first time and stages 4-5 while they are missing (UserError naming
    the stage to run first)."""
    from feature_extraction import load_encoder

    with shared["prompts_lock"]:  # one prompt at a time: two browsers asking for one text encode it once
        if text in shared["prompts"]:
            return shared["prompts"][text]
        with shared["render_lock"]:
            attach_language(scene, args.cams)
            if shared["encoder"] is None:
                shared["encoder"] = load_encoder(args.encoder, scene["device"], args.viclip_ckpt)
            positives, shared["negatives"] = encode_prompts(shared["encoder"], [text], scene["device"])
        timeline = prompt_timeline(
            scene["frames"],
            scene["views"],
            scene["stages"].ae,
            positives[0],
            shared["negatives"],
            args.threshold,
            args.relevancy_stride,
            args.fg_only,
            shared["render_lock"],
            progress,
        )
        shared["prompts"][text] = {"text": text, "positive": positives[0], "timeline": timeline}
        return shared["prompts"][text]


def export_view(scene, cam, prompts, args, negatives):
    """The current view held still over the whole video, as visualize_4legs.py renders a view:
    per prompt (entries of get_prompt) <dir>/<prompt_dir>/viewer.mp4, timeline.json, timeline.png,
    <dir> = results/<exp>/<seq>/viewer-<date-time>/. Returns <dir>."""
    from visualize_4legs import render_prompts

    out = os.path.join(
        helpers.stage_dir("results", scene["exp"], scene["seq_dir"]), time.strftime("viewer-%Y%m%d-%H%M%S")
    )
    options = argparse.Namespace(
        prompt=[p["text"] for p in prompts],
        fg_only=args.fg_only,
        fps=args.fps,
        relevancy_stride=args.relevancy_stride,
        threshold=args.threshold,
    )
    positives = torch.stack([p["positive"] for p in prompts])
    render_prompts(
        options,
        scene["stages"],
        [("viewer", [cam] * scene["num_t"])],
        positives,
        negatives,
        [os.path.join(out, prompt_dir(p["text"])) for p in prompts],
    )
    return out


# ---------------------------------------------------------------- the browser's side (viser)


def palette():
    """Prompt colours (r, g, b) in [0, 1]: matplotlib's tab10, red and blue last (the demo's
    objects are red and blue, and a heatmap in their colour would hide them)."""
    from matplotlib import colormaps

    colours = [tuple(float(c) for c in colormaps["tab10"](i)[:3]) for i in (1, 2, 4, 6, 8, 9, 5, 7, 3, 0)]
    return colours


def hex_colour(colour):
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour)


def add_client(client, scene, shared, args):
    """The panel, the camera and the render thread of one browser; returns its state dict."""
    gui, num_t = client.gui, scene["num_t"]
    state = {
        "t": 0,
        "stepped": 0.0,
        "playing": False,
        "prompts": [],
        "plot": None,
        "colours_used": 0,
        "rate_shown": 0.0,
        "failed": False,
        "adding": threading.Lock(),
        "wake": threading.Event(),
        "stop": threading.Event(),
    }
    status = gui.add_markdown("Type a prompt under Prompts.", order=0)

    def say(text, error=False):
        status.content = f"**{text}**" if error else text

    with gui.add_folder("Time", order=1):
        time_slider = gui.add_slider("timestep", min=0, max=max(num_t - 1, 1), step=1, initial_value=0)
        play = gui.add_button("play")
        loop = gui.add_checkbox("loop", True)
        speed = gui.add_slider("timesteps / s", min=0.5, max=60.0, step=0.5, initial_value=float(args.fps))
    with gui.add_folder("View", order=2):
        preset = gui.add_dropdown("camera", tuple(scene["presets"]), initial_value=args.camera)
        mode = gui.add_dropdown("view", VIEW_MODES, initial_value="blend")
        height = gui.add_slider("render height (px)", min=40, max=2160, step=10, initial_value=args.height)
        rate = gui.add_markdown("")
    with gui.add_folder("Prompts", order=3) as prompts_folder:
        text = gui.add_text("prompt", "", order=0)
        add = gui.add_button("add prompt", order=1)
        export = gui.add_button("export the current view", order=2)

    def wake(_=None):
        state["wake"].set()

    def go_to(t):
        state["t"] = min(max(int(t), 0), num_t - 1)
        time_slider.value = state["t"]
        wake()

    def set_playing(on):
        state["playing"], state["stepped"] = on, time.perf_counter()
        play.label = "pause" if on else "play"
        wake()

    def apply_preset(_=None):
        position, look_at, up, fov = preset_pose(scene["presets"][preset.value], scene["center"])
        with client.atomic():
            client.camera.position = position
            client.camera.look_at = look_at
            client.camera.up_direction = up
            client.camera.fov = fov

    def redraw_timeline():
        """The plot of every prompt's timeline, drawn anew (uPlot takes no new series in place)."""
        if state["plot"] is not None:
            state["plot"].remove()
            state["plot"] = None
        if not state["prompts"]:
            return
        import viser.uplot as uplot

        timelines = [p["entry"]["timeline"] for p in state["prompts"]]
        top = max(0.1, 1.05 * max(max(tl["scores"]) for tl in timelines))
        data = (
            np.arange(num_t, dtype=np.float64),
            np.full(num_t, args.threshold),
            *(np.asarray(tl["scores"], dtype=np.float64) for tl in timelines),
        )
        series = (
            uplot.Series(label="timestep"),
            uplot.Series(label="threshold", stroke="#888888", dash=(4, 4)),
            *(
                uplot.Series(
                    label=p["entry"]["text"][:24], stroke=hex_colour(p["colour"]), width=2, show=p["shown"].value
                )
                for p in state["prompts"]
            ),
        )
        with prompts_folder:
            state["plot"] = gui.add_uplot(
                data,
                series,
                title="relevance score per timestep",
                scales={"x": uplot.Scale(time=False), "y": uplot.Scale(range=(0, top))},
                aspect=1.6,
                order=3,
            )

    def add_prompt(_=None):
        with state["adding"]:  # two clicks on "add prompt" add it once
            add_prompt_now(text.value.strip())

    def add_prompt_now(prompt):
        if not prompt:
            return say("type a prompt first, e.g. a red ball flying in the air", error=True)
        if any(p["entry"]["text"] == prompt for p in state["prompts"]):
            return say(f'"{prompt}" is shown already')
        say(f'"{prompt}": encoding and scoring every timestep ...')
        try:
            entry = get_prompt(
                scene, shared, prompt, args, progress=lambda t: say(f'"{prompt}": timeline {t + 1}/{num_t}')
            )
        except helpers.UserError as e:
            return say(f"cannot show prompts yet: {e}", error=True)
        except Exception as e:  # keep serving, as for a render that fails
            traceback.print_exc()
            return say(f'"{prompt}" failed: {type(e).__name__}: {e}', error=True)
        show_prompt(entry)
        spans = entry["timeline"]["spans"]
        say(f'"{prompt}": ' + (", ".join(f"timesteps {a}-{b}" for a, b in spans) if spans else "not found"))

    def show_prompt(entry):
        colours = palette()
        colour = colours[state["colours_used"] % len(colours)]
        state["colours_used"] += 1
        timeline = entry["timeline"]
        with prompts_folder, gui.add_folder(entry["text"][:40], order=10 + len(state["prompts"])) as folder:
            spans = ", ".join(f"{a}-{b}" for a, b in timeline["spans"]) or "none"
            gui.add_html(
                f'<span style="color:{hex_colour(colour)}">&#9632;</span> spans: {spans}; '
                f"peak relevance {timeline['peak']:.3f}"
            )
            shown = gui.add_checkbox("shown", True)
            for first, last in timeline["spans"]:
                gui.add_button(f"go to {first}-{last}").on_click(lambda _, t=first: (set_playing(False), go_to(t)))
            remove = gui.add_button("remove")
        item = {"entry": entry, "colour": colour, "shown": shown, "folder": folder}
        shown.on_update(lambda _: (redraw_timeline(), wake()))
        remove.on_click(lambda _: (state["prompts"].remove(item), folder.remove(), redraw_timeline(), wake()))
        state["prompts"].append(item)
        redraw_timeline()
        wake()

    def export_now(_=None):
        shown = [p["entry"] for p in state["prompts"] if p["shown"].value]
        if not shown:
            return say("add (or show) a prompt to export", error=True)
        say("exporting the current view over every timestep ...")
        try:
            out = export_view(scene, current_camera(), shown, args, shared["negatives"])
        except Exception as e:  # keep serving, as for a render that fails
            if not isinstance(e, helpers.UserError):
                traceback.print_exc()
            return say(f"export failed: {type(e).__name__}: {e}", error=True)
        say(f"exported to {out}/ (per prompt: viewer.mp4, timeline.json, timeline.png)")

    def current_camera():
        camera = client.camera
        width, h = render_size(height.value, camera.aspect)
        return viewer_camera(camera.wxyz, camera.position, camera.fov, width, h, scene["device"])

    time_slider.on_update(lambda event: go_to(event.target.value))
    play.on_click(lambda _: set_playing(not state["playing"]))
    preset.on_update(apply_preset)
    for handle in (mode, height):
        handle.on_update(wake)
    add.on_click(add_prompt)
    export.on_click(export_now)
    client.camera.on_update(wake)
    apply_preset()

    def draw():
        lights = [
            {"positive": p["entry"]["positive"], "colour": p["colour"], "peak": p["entry"]["timeline"]["peak"]}
            for p in state["prompts"]
            if p["shown"].value
        ]
        started = time.perf_counter()
        cam = current_camera()
        with shared["render_lock"]:  # lights exist only once the lifting stages do
            image = render_frame(
                cam,
                scene["frames"][state["t"]],
                mode.value,
                lights,
                scene["stages"].ae if lights else None,
                shared["negatives"],
                shared["turbo"],
                args.threshold,
                args.relevancy_stride,
                scene["env_map"],
            )
        client.scene.set_background_image(image, format="jpeg", jpeg_quality=JPEG_QUALITY)
        return cam.image_width, cam.image_height, time.perf_counter() - started

    def advance(now):
        """The next timestep once 1 / speed seconds have passed since the last step; never two at
        once, so that a slow render (the CPU) slows the playback down rather than skipping timesteps.
        True when the timestep changed."""
        if now - state["stepped"] < 1 / speed.value:
            return False
        state["stepped"] = now
        if state["t"] + 1 < num_t or loop.value:
            go_to((state["t"] + 1) % num_t)
            return True
        set_playing(False)
        return False

    def render_loop():
        while not state["stop"].is_set():
            woke = state["wake"].wait(PLAY_WAIT_S if state["playing"] else IDLE_WAIT_S)
            state["wake"].clear()
            now = time.perf_counter()
            changed = (state["playing"] and advance(now)) or woke
            if not changed or state["stop"].is_set():
                continue
            try:
                width, h, seconds = draw()
                if state["failed"]:
                    state["failed"] = False
                    say("rendering again")
                if now - state["rate_shown"] > 0.5:  # not one panel message per frame
                    rate.content = f"{width}x{h}: {1000 * seconds:.0f} ms a frame ({scene['device'].type})"
                    state["rate_shown"] = now
            except Exception as e:  # keep serving: say why in the panel, the traceback on the console
                traceback.print_exc()
                set_playing(False)
                state["failed"] = True
                say(f"render failed: {type(e).__name__}: {e}", error=True)

    threading.Thread(target=render_loop, daemon=True, name=f"render-{client.client_id}").start()
    wake()
    for prompt in args.prompt or ():  # computed before serving (serve): shown at once
        text.value = prompt
        add_prompt()
    return state


def start_viewer(scene, args):
    """Serve the viewer (viser's threads answer the browsers, one render thread each); returns the
    ViserServer (its get_port(): viser takes the next free port when args.port is taken)."""
    import viser

    shared = {
        "prompts": {},
        "encoder": None,
        "negatives": None,
        "turbo": turbo_table(scene["device"]),
        "render_lock": threading.Lock(),
        "prompts_lock": threading.Lock(),
    }
    for prompt in args.prompt or ():
        try:
            get_prompt(scene, shared, prompt, args)
        except helpers.UserError as e:  # the viewer still shows stage 1; the panel repeats this
            print(f"prompts cannot be shown yet: {e}")
    server = viser.ViserServer(host=args.host, port=args.port, label="4-LEGS viewer", verbose=False)
    server.scene.set_up_direction("-y")  # PanopticSports: +y points down, to the floor
    position, look_at, up, fov = preset_pose(scene["presets"][args.camera], scene["center"])
    server.initial_camera.position, server.initial_camera.look_at = position, look_at
    server.initial_camera.up, server.initial_camera.fov = up, fov
    clients = {}

    def connect(client):
        clients[client.client_id] = add_client(client, scene, shared, args)

    def disconnect(client):
        if client.client_id in clients:
            clients.pop(client.client_id)["stop"].set()

    server.on_client_connect(connect)
    server.on_client_disconnect(disconnect)
    return server


def check_start(args, scene):
    """The start options that depend on the device and the scene: --height's default, --camera."""
    args.height = args.height or (360 if scene["device"].type == "cuda" else CPU_HEIGHT)
    args.camera = args.camera or next(iter(scene["presets"]))
    if args.camera not in scene["presets"]:
        raise helpers.UserError(
            f"--camera {args.camera!r}: no such camera; choose one of "
            + ", ".join(repr(name) for name in scene["presets"])
        )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helpers.add_sequence_option(p)
    p.add_argument("-e", "--exp", default="exp1", help="experiment name (default: %(default)s)")
    p.add_argument("--encoder", required=True, help=ENCODER_OF_STAGES)
    p.add_argument("-p", "--prompt", action="append", help="prompt shown to every browser from the start (repeat -p)")
    p.add_argument(
        "--cams",
        choices=("test", "train", "orbit"),
        default="test",
        help="views of the timeline, as visualize_4legs.py --cams (default: %(default)s)",
    )
    p.add_argument(
        "--fg-only",
        action="store_true",
        help="score the timeline only on the foreground render, as visualize_4legs.py --fg-only",
    )
    p.add_argument(
        "--camera",
        default=None,
        help="camera preset a browser starts at, e.g. 'test cam3' (default: the first train camera)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help=f"render height in pixels a browser starts at (default: 360 on CUDA, {CPU_HEIGHT} on the CPU)",
    )
    p.add_argument(
        "--fps",
        type=int,
        default=15,
        help="playback speed a browser starts at, timesteps per second; also the exported videos' "
        "frame rate (default: %(default)s)",
    )
    p.add_argument(
        "--host",
        default="localhost",
        help="address to serve on (default: %(default)s; 0.0.0.0 for every network interface)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    add_prompt_options(p)
    add_cache_dir_option(p)
    args = p.parse_args(argv)
    args.seq = helpers.find_sequence(args.seq)
    check_prompt_options(args)
    helpers.check_option(args, "fps", at_least=1)
    helpers.check_option(args, "height", at_least=8)
    helpers.check_option(args, "port", at_least=1, below=65536)
    from visualize_4legs import check_prompts

    check_prompts(args.prompt or [])  # as visualize_4legs.py: text in each, a folder of its own for the export
    return args


def main(argv=None):
    args = parse_args(argv)
    scene = load_scene(args.seq, args.exp, args.encoder, helpers.pick_device(args.device), args.cache_dir)
    check_start(args, scene)
    server = start_viewer(scene, args)
    host = "localhost" if args.host == "0.0.0.0" else args.host
    print(f"viewer: http://{host}:{server.get_port()} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("viewer stopped")
    finally:
        server.stop()


if __name__ == "__main__":
    helpers.run_main(main, resumes=False)
