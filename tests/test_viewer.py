"""viewer.py: the frame and timeline functions on the CPU, then the viewer itself in headless Chromium.

The scene is test_legs.py's `chain`: stages 3-5 on a small synthetic sequence (96x54, 12 timesteps),
colour encoder, ground-truth Gaussians as stage 1."""

import json
import math
import os
import re
import shutil
import socket
import time

import numpy as np
import pytest
import torch

import helpers
import viewer
from feature_extraction.autoencoder import Autoencoder
from feature_extraction.relevancy import overlay, relevance_map, render_features
import test_legs
from test_legs import BALL, EXP, SEQ, random_scene

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ---------------------------------------------------------------- frames and cameras


def test_device_blend_is_overlay():
    """The viewer's turbo blend, done with tensors, is visualize_4legs.py's overlay() (numpy)."""
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(30, 40, generator=g)
    heat[0, :4] = torch.tensor([0.0, 1.0, 0.5, 255.5 / 256])  # the colormap's edges
    rgb = torch.rand(3, 30, 40, generator=g)
    turbo = viewer.turbo_table("cpu")
    colour = viewer.colour_heat(heat[None], None, turbo)
    got = viewer.compose("blend", colour, rgb).numpy().astype(int)
    expected = overlay(heat.numpy(), helpers.to_uint8(rgb)).astype(int)
    assert np.abs(got - expected).max() <= 1 and (got == expected).mean() > 0.99
    # several prompts: each pixel in its hottest prompt's colour
    two = torch.stack([heat, 1 - heat])
    colour = viewer.colour_heat(two, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), turbo)
    hot_first = heat >= 0.5  # a tie goes to the first prompt
    assert torch.allclose(colour[hot_first][:, 0], 255 * heat[hot_first]) and (colour[hot_first][:, 2] == 0).all()
    assert torch.allclose(colour[~hot_first][:, 2], 255 * (1 - heat[~hot_first]))


def quat_of(rotation):
    """Unit quaternion (w, x, y, z) of a rotation matrix [3, 3] (its trace is > -1 here)."""
    w = math.sqrt(max(1.0 + np.trace(rotation), 1e-12)) / 2
    return np.array(
        [
            w,
            (rotation[2, 1] - rotation[1, 2]) / (4 * w),
            (rotation[0, 2] - rotation[2, 0]) / (4 * w),
            (rotation[1, 0] - rotation[0, 1]) / (4 * w),
        ]
    )


def test_a_preset_pose_renders_as_its_camera():
    """A train camera as the browser's camera (preset_pose, then the orientation a browser derives
    from look-at and up, OpenCV frame) gives that camera's rasterizer settings back."""
    w, h = 96, 54
    k = np.array([[70.0, 0, w / 2], [0, 70.0, h / 2], [0, 0, 1]])
    w2c = helpers.orbit_w2c((0.0, -0.3, 0.0), 4.4, 1.5, 0.7)
    position, look_at, up, fov = viewer.preset_pose((w, h, k, w2c), np.array([0.0, -0.3, 0.0]))
    forward = (look_at - position) / np.linalg.norm(look_at - position)
    down = -up + (up @ forward) * forward
    down /= np.linalg.norm(down)
    c2w_rotation = np.stack([np.cross(down, forward), down, forward], 1)
    cam = viewer.viewer_camera(quat_of(c2w_rotation), position, fov, w, h)
    expected = helpers.setup_camera(w, h, k, w2c)
    assert (cam.image_width, cam.image_height) == (w, h)
    assert cam.tanfovx == pytest.approx(expected.tanfovx) and cam.tanfovy == pytest.approx(expected.tanfovy)
    assert torch.allclose(cam.viewmatrix, expected.viewmatrix, atol=1e-5)
    assert torch.allclose(cam.projmatrix, expected.projmatrix, atol=1e-5)
    assert viewer.render_size(180, 16 / 9) == (320, 180)


def test_render_frame_modes():
    """RGB is the render; blend and heatmap are the relevance of the decoded features, heat = relevance
    / the prompt's peak, coloured as overlay(); foreground only keeps the relevance on the foreground.
    With stage 1's environment map every mode shows it behind the Gaussians, as render_d3dgs does."""
    torch.manual_seed(0)
    frame = random_scene(400)
    frame["seg_colors"][200:] = torch.tensor([0.0, 0.0, 1.0])  # half of the Gaussians are background
    frame["legs_features"] = torch.nn.functional.normalize(torch.randn(400, 128), dim=-1)
    ae = Autoencoder().eval()
    negatives = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    w, h = 48, 32
    cam = helpers.setup_camera(
        w, h, [[40.0, 0, w / 2], [0, 40.0, h / 2], [0, 0, 1]], helpers.orbit_w2c((0, 0, 0), 4.0, 1.0, 0.4)
    )
    rgb, feats, fg = render_features(cam, frame, frame["legs_features"], with_fg=True)
    # the prompt: what the most covered pixel decodes to, so that some relevance is well above zero
    with torch.no_grad():
        positive = ae.decode(torch.nn.functional.normalize(feats[:, h // 2, w // 2][None], dim=-1))[0]
    relevance = relevance_map(feats, ae, positive[None], negatives)[0]
    peak = float(relevance.max())
    assert peak > 0.2
    light = {"positive": positive, "colour": (1.0, 0.5, 0.0), "peak": peak}
    turbo = viewer.turbo_table("cpu")

    def frame_in(mode, lights=(light,), env_map=None):
        return viewer.render_frame(cam, frame, mode, list(lights), ae, negatives, turbo, env_map=env_map).astype(int)

    assert (frame_in("RGB") == helpers.to_uint8(rgb)).all()
    assert (frame_in("blend", ()) == helpers.to_uint8(rgb)).all()  # no prompt shown: the render
    blend = overlay((relevance / peak).numpy(), helpers.to_uint8(rgb)).astype(int)
    assert np.abs(frame_in("blend") - blend).max() <= 1
    assert np.abs(frame_in("heatmap") - np.asarray(turbo)[(relevance / peak * 256).long().clamp(0, 255)]).max() <= 1
    on_fg = overlay((relevance * (fg > 0.5) / peak).numpy(), helpers.to_uint8(rgb)).astype(int)
    assert np.abs(frame_in("foreground only") - on_fg).max() <= 1 and (fg < 0.5).any()

    env_map = torch.rand(4, 6, 12, generator=torch.Generator().manual_seed(1))
    background = helpers.view_background(cam, env_map)
    over_map, feats_over_map, _ = render_features(cam, frame, frame["legs_features"], True, background)
    gaussians = {k: v for k, v in frame.items() if k != "legs_features"}
    torch.testing.assert_close(over_map, helpers.render_d3dgs(cam, gaussians, background)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats_over_map, feats)
    assert (over_map - rgb).abs().amax() > 0.2  # the map shows where the Gaussians leave light through
    assert np.abs(frame_in("RGB", env_map=env_map) - helpers.to_uint8(over_map)).max() <= 1
    blend = overlay((relevance / peak).numpy(), helpers.to_uint8(over_map)).astype(int)
    assert np.abs(frame_in("blend", env_map=env_map) - blend).max() <= 1


# ---------------------------------------------------------------- timelines on a small lifted scene

# test_legs.py's module fixture (stages 3-5 on its small synthetic sequence), registered here by this name
lifted_chain = test_legs.chain


@pytest.fixture(scope="module")
def lifted(lifted_chain):
    """The chain's folder and the timesteps its ball flies (gt/objects.json)."""
    with open(os.path.join(lifted_chain, SEQ, "gt", "objects.json")) as f:
        objects = json.load(f)["objects"]
    return lifted_chain, next(o["moving_timesteps"] for o in objects if o["name"] == "ball")


def viewer_args(*extra):
    return viewer.parse_args(["-s", SEQ, "-e", EXP, "--encoder", "color", *extra])


def new_shared():
    """start_viewer's shared state without its turbo table."""
    return {
        "prompts": {},
        "encoder": None,
        "negatives": None,
        "render_lock": viewer.threading.Lock(),
        "prompts_lock": viewer.threading.Lock(),
    }


def test_timeline_and_export_are_visualize_4legs(lifted):
    """A prompt's timeline in the viewer is visualize_4legs.py's timeline of the same views (here the
    test camera): the export of that camera held still, written by visualize_4legs.py's own
    render_prompts, has the same scores and spans. The text is encoded once."""
    root, flight = lifted
    os.chdir(root)
    args = viewer_args()
    scene = viewer.load_scene(args.seq, args.exp, args.encoder, torch.device("cpu"))
    shared, steps = new_shared(), []
    entry = viewer.get_prompt(scene, shared, BALL, args, progress=steps.append)
    timeline = entry["timeline"]
    assert steps == list(range(scene["num_t"])) and list(timeline["per_view"]) == ["cam0"]
    found = {t for a, b in timeline["spans"] for t in range(a, b + 1)}
    assert found >= set(flight) and min(found) >= min(flight) - 1, (timeline["spans"], flight)
    encoder = shared["encoder"]
    assert viewer.get_prompt(scene, shared, BALL, args) is entry and shared["encoder"] is encoder
    w, h, k, w2c = scene["presets"][f"test cam{helpers.load_meta(SEQ, 'test')['cam_id'][0]}"]
    out = viewer.export_view(scene, helpers.setup_camera(w, h, k, w2c), [entry], args, shared["negatives"])
    assert out.startswith(f"results/{EXP}/synthetic/viewer-")
    with open(f"{out}/a_red_ball_flying_in_the_air/timeline.json") as f:
        exported = json.load(f)
    assert exported["views"] == ["viewer"] and exported["spans"] == timeline["spans"]
    assert np.allclose(exported["scores"], timeline["scores"], atol=2e-5)
    assert exported["per_view"]["viewer"]["peak_relevance"] == pytest.approx(timeline["peak"], abs=1e-4)
    for name in ("viewer.mp4", "timeline.png"):
        assert os.path.getsize(f"{out}/a_red_ball_flying_in_the_air/{name}") > 0


def test_prompt_before_lifting_names_the_stage(lifted):
    """With stage 1 only, the viewer shows the scene; a prompt says to run stage 5 first."""
    os.chdir(lifted[0])
    os.makedirs("output/nolegs/synthetic", exist_ok=True)
    shutil.copy(f"output/{EXP}/synthetic/params.npz", "output/nolegs/synthetic/params.npz")
    args = viewer.parse_args(["-s", SEQ, "-e", "nolegs", "--encoder", "color"])
    scene = viewer.load_scene(args.seq, args.exp, args.encoder, torch.device("cpu"))
    shared = new_shared()
    with pytest.raises(helpers.UserError, match=r"train_4legs\.py -s data/synthetic -e nolegs"):
        viewer.get_prompt(scene, shared, BALL, args)
    with pytest.raises(helpers.UserError, match="--camera 'nowhere': no such camera"):
        viewer.main(["-s", SEQ, "-e", "nolegs", "--encoder", "color", "--camera", "nowhere"])


# ---------------------------------------------------------------- the viewer in a real browser

VIEWPORT = (960, 540)  # 16:9, as the synthetic cameras: the browser's image is the camera's image
WAIT_S = 90  # longest wait for the viewer or the browser, each time (a loaded 2-core machine)


def wait_for(what, check, seconds=WAIT_S):
    """check()'s first value that is not None or False, asked every 0.3 s; fails naming `what` after
    `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value is not None and value is not False:
            return value
        time.sleep(0.3)
    pytest.fail(f"waited {seconds} s for {what}")


@pytest.fixture
def served(lifted):
    """The viewer on the lifted scene, on the CPU, on 127.0.0.1, in this process: yields its URL."""
    os.chdir(lifted[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = viewer_args("--host", "127.0.0.1", "--port", str(port), "--height", "54", "--device", "cpu")
    scene = viewer.load_scene(args.seq, args.exp, args.encoder, torch.device("cpu"))
    viewer.check_start(args, scene)
    server = viewer.start_viewer(scene, args)
    try:
        yield f"http://127.0.0.1:{server.get_port()}"
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through its chromedriver (selenium), never a downloaded browser."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            f"needs Debian's Chromium at {CHROMIUM} and {CHROMEDRIVER}: "
            "apt-get install chromium chromium-driver (.ci/run does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements.txt)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def open_viewer(driver, url):
    driver.get(url)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
    )
    wait_for("a first frame", lambda: "ms a frame" in driver.find_element("tag name", "body").text)
    # headless Chromium renders WebGL in software, and viser says so in a notification over the
    # image's corner, which may come or go between two screenshots: hidden for good
    driver.execute_script(
        "const style = document.createElement('style'); "
        "style.textContent = '#webgl-software-rendering { display: none !important; }'; "
        "document.head.appendChild(style);"
    )


def labelled(driver, label):
    """The input a panel label names (a slider's: the hidden one holding its value)."""
    return driver.find_element("xpath", f"//label[text()='{label}']/following::input[1]")


def button(driver, text):
    """The button labelled `text`, once the viewer shows it (a label changes after the server's answer)."""
    return wait_for(
        f"the button '{text}'", lambda: driver.find_elements("xpath", f"//button[normalize-space(.)='{text}']") or None
    )[0]


def screenshot(driver):
    """The viewport as int RGB [H, W, 3]."""
    import io
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)


def next_image(driver, before):
    """The screenshot once it differs from `before` and has stopped changing."""

    def settled():
        first = screenshot(driver)
        if np.abs(first - before).max() < 30:
            return None
        time.sleep(0.5)
        second = screenshot(driver)
        return second if np.abs(second - first).max() < 30 else None

    return wait_for("the image to change", settled)


def turbo_heat(colour):
    """Heat in [0, 1] of turbo colours [P, 3] (0..255): the nearest entry of the table."""
    table = viewer.turbo_table("cpu")
    return torch.cdist(torch.as_tensor(colour, dtype=torch.float32), table).argmin(1).numpy() / 255.0


def test_browser_prompt_heatmap_lands_on_the_object(lifted, served, browser, monkeypatch):
    """Type a prompt in headless Chromium: the image changes, the timeline's span button jumps to the
    ball's flight, the keyboard steps the time slider, the heat lies on the ball (ground-truth ids)
    in mid-flight; a render that fails is reported in the panel and the viewer goes on; a second
    browser moves its own camera, not the first one's; play and pause."""
    (root, flight), driver = lifted, browser

    def panel_text():
        return driver.find_element("tag name", "body").text

    open_viewer(driver, served)
    rgb_t0 = screenshot(driver)
    labelled(driver, "prompt").send_keys(BALL)
    button(driver, "add prompt").click()
    span = wait_for(
        "the prompt's span buttons",
        lambda: driver.find_elements("xpath", "//button[starts-with(normalize-space(.), 'go to ')]") or None,
    )[0]
    next_image(driver, rgb_t0)  # the heatmap is drawn over the render
    first = int(re.search(r"go to (\d+)-", span.text)[1])
    assert min(flight) - 1 <= first <= min(flight), (span.text, flight)  # when the ball leaves the floor
    before = screenshot(driver)
    span.click()
    wait_for("the jump", lambda: labelled(driver, "timestep").get_attribute("value") == str(first))
    blend = next_image(driver, before)
    # then step the slider with the keyboard to the middle of the flight (the span may start a
    # timestep early, where the ball's relevance is faint and the frame's hottest pixel means
    # little), one timestep at a time: each new image is then the render of the new timestep
    middle = flight[len(flight) // 2]
    thumb = driver.find_element("xpath", "//label[text()='timestep']/following::*[@role='slider'][1]")
    from selenium.webdriver.common.keys import Keys

    for t in range(first + 1, middle + 1):
        thumb.send_keys(Keys.ARROW_RIGHT)
        wait_for(f"timestep {t}", lambda t=t: labelled(driver, "timestep").get_attribute("value") == str(t))
        blend = next_image(driver, blend)
    driver.execute_script("arguments[0].click()", labelled(driver, "shown"))  # hide the prompt: the render
    rgb = next_image(driver, blend)
    # blend = (turbo colour + render) / 2, where the heatmap changed the image
    changed = np.abs(blend - rgb).sum(-1) > 12
    panel = driver.find_element("css selector", "[data-testid=floating-panel-handle]").rect
    changed[:, int(panel["x"]) - 10 :] = False
    heat = np.zeros(changed.shape)
    heat[changed] = turbo_heat(np.clip(2 * blend - rgb, 0, 255)[changed])
    from PIL import Image

    cam_id = helpers.load_meta(os.path.join(root, SEQ), "train")["cam_id"][0]
    ids = Image.open(os.path.join(root, SEQ, "gt", "ids", str(cam_id), f"{middle:06d}.png"))
    ids = np.asarray(ids.resize(VIEWPORT, Image.NEAREST))
    # the hot pixels lie on the ball, and so does their heat-weighted centre (a single hottest pixel
    # is not trusted: over a red ball the turbo colour read back from the screenshot is noisy, and
    # the heat saturates across the whole ball)
    hot = heat > 0.5 * heat.max()
    rows, cols = np.nonzero(hot)
    centre = tuple(int(round(np.average(v, weights=heat[hot]))) for v in (rows, cols))
    assert ids[centre] == 1 and (ids[hot] == 1).mean() > 0.8, (centre, np.bincount(ids[hot]))

    def broken(*_, **__):
        raise RuntimeError("a broken rasterizer")

    monkeypatch.setattr(viewer, "render_frame", broken)
    driver.execute_script("arguments[0].click()", labelled(driver, "shown"))
    wait_for("the failure in the panel", lambda: "render failed: RuntimeError: a broken rasterizer" in panel_text())
    monkeypatch.undo()
    driver.execute_script("arguments[0].click()", labelled(driver, "shown"))
    wait_for("rendering again", lambda: "rendering again" in panel_text())
    # a second browser (tab): its camera moves, the first one's stays
    first_tab = driver.current_window_handle
    driver.switch_to.new_window("tab")
    open_viewer(driver, served)
    second_before = screenshot(driver)
    from selenium.webdriver import ActionChains

    canvas = driver.find_element("tag name", "canvas")
    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(150, 40).release().perform()
    next_image(driver, second_before)
    driver.switch_to.window(first_tab)
    time.sleep(1.0)
    assert np.abs(screenshot(driver) - rgb)[:, : int(panel["x"]) - 10].mean() < 2
    # playback moves the time on, pause stops it
    button(driver, "play").click()
    wait_for("the playback", lambda: labelled(driver, "timestep").get_attribute("value") != str(middle))
    button(driver, "pause").click()
    wait_for("the pause", lambda: driver.find_elements("xpath", "//button[normalize-space(.)='play']") or None)
