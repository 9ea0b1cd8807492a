"""Issue 19: bad inputs as a new user gives them, on a tiny synthetic sequence, stage by stage. Each
case asserts a one-line UserError naming the file or value, and that nothing finished was lost
(every file under output/, results/ and the sequence folder as it was, unless the case is about
what a run may change). Stages run in-process (their main(argv)) in a copy of a trained folder."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate_grounding
import extract_features
import helpers
import point_cloud
import prepare_sequence
import synthetic_sequence
import train_4legs
import train_autoencoder
import train_d3dgs
import visualize_4legs
import visualize_d3dgs
from feature_extraction.relevancy import prompt_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, EXP = "data/syn", "x"
TINY = {"width": 32, "height": 18, "num_timesteps": 4, "num_train": 2, "num_test": 1}
STAGE1 = ["-s", SEQ, "-e", EXP, "--device", "cpu", "--iters-first", "3", "--iters", "1", "--max-gaussians", "2000"]
STAGE2 = ["-s", SEQ, "-e", EXP, "--device", "cpu", "--train-cams", "0"]
STAGE3 = ["-s", SEQ, "--encoder", "color", "--device", "cpu"]
STAGE4 = [
    "-s",
    SEQ,
    "--encoder",
    "color",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--tiles-per-epoch",
    "256",
    "--batch-size",
    "128",
    "--val-tiles",
    "256",
]
STAGE5 = ["-s", SEQ, "-e", EXP, "--encoder", "color", "--device", "cpu", "--iters", "2", "--warm-iters", "1"]
STAGE6 = ["-s", SEQ, "-e", EXP, "--encoder", "color", "--device", "cpu", "--cams", "test"]
OUT = f"output/{EXP}/syn"


# ---------------------------------------------------------------- tools


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with the tiny sequence in data/syn (4 timesteps, 2 train and 1 test camera) and its
    stage 1 in output/x/syn."""
    root = tmp_path_factory.mktemp("trained")
    with contextlib.chdir(root):
        synthetic_sequence.generate(SEQ, **TINY)
        train_d3dgs.main(STAGE1)
    return root


@pytest.fixture(scope="module")
def chained(trained, tmp_path_factory):
    """`trained` plus stages 3-5 (colour encoder, a one-epoch autoencoder, a few iterations each)."""
    root = tmp_path_factory.mktemp("chained")
    shutil.copytree(trained, root, dirs_exist_ok=True)
    with contextlib.chdir(root):
        extract_features.main(STAGE3)
        train_autoencoder.main(STAGE4)
        train_4legs.main(STAGE5)
    return root


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A copy of `trained`, the working directory of the test."""
    shutil.copytree(trained, tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


@pytest.fixture
def chain(chained, tmp_path, monkeypatch):
    shutil.copytree(chained, tmp_path / "chain")
    monkeypatch.chdir(tmp_path / "chain")
    return tmp_path / "chain"


def snapshot():
    """{path: sha256} of every file under the working directory (outputs, results, the sequence)."""
    files = {}
    for folder, _, names in os.walk("."):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return files


def refused(fn, argv, *names, may_change=()):
    """fn(argv) raises a one-line UserError naming each of `names`, and changes no file (but those of
    may_change). -> the message."""
    before = snapshot()
    with pytest.raises(helpers.UserError) as caught:
        fn(argv)
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in names), message
    after = snapshot()
    for path in may_change:
        before.pop(path, None), after.pop(path, None)
    assert after == before, "a refused run changed files"
    return message


def train_image(t):
    """The image file of train camera 0 at timestep t."""
    return os.path.join(SEQ, "ims", helpers.load_meta(SEQ, "train")["fn"][t][0])


def dead_pid():
    """The pid of a process that has ended (it is not reused this soon)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def put_nan(path, key):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays[key] = arrays[key].copy()
    arrays[key].flat[0] = np.nan
    np.savez(path, **arrays)


# ---------------------------------------------------------------- 1. -f never destroys finished timesteps


def test_first_after_last_is_refused_before_anything(work):
    refused(train_d3dgs.main, STAGE1 + ["-f", "3", "-l", "1"], "-f 3 -l 1")
    refused(train_d3dgs.main, STAGE1 + ["-f", "9"], "-f 9")
    refused(train_d3dgs.main, STAGE1 + ["-f", "-1"], "-f -1")
    refused(train_d3dgs.main, STAGE1 + ["-l", "9"], "-l 9")


def test_first_and_last_on_a_new_experiment(work):
    refused(train_d3dgs.main, [*STAGE1[:2], "-e", "new", *STAGE1[4:], "-f", "3", "-l", "1"], "-f 3 -l 1")


def test_missing_image_of_the_range_stops_before_discarding(work):
    missing = train_image(3)
    os.remove(missing)
    refused(train_d3dgs.main, STAGE1 + ["-f", "2"], missing)


def test_unreadable_or_resized_image_of_the_range_stops_before_discarding(work):
    from PIL import Image

    image, mask = train_image(3), helpers.seg_path(SEQ, helpers.load_meta(SEQ, "train")["fn"][2][0])
    with open(image, "wb") as f:
        f.write(b"not a JPEG")
    refused(train_d3dgs.main, STAGE1 + ["-f", "2"], image, "cannot be read")
    Image.new("RGB", (TINY["width"] + 1, TINY["height"])).save(image)
    refused(train_d3dgs.main, STAGE1 + ["-f", "2"], image, "is 33x18, the meta file says 32x18")
    Image.new("RGB", (TINY["width"], TINY["height"])).save(image)
    truncate(mask, keep=0.3)  # the PNG signature survives, its header does not
    refused(train_d3dgs.main, STAGE1 + ["-f", "2"], mask, "cannot be read")


def test_unreadable_resume_file_stops_before_discarding(work):
    truncate(f"{OUT}/timesteps/000001.npz")
    refused(train_d3dgs.main, STAGE1 + ["-f", "2"], "000001.npz", "BadZipFile", "-f 1")


def test_retrained_timestep_keeps_the_later_ones_until_replaced(work, monkeypatch):
    """-f 2 sets timesteps 2-3 aside (not in params.npz: they followed the old 2); a run that stops
    at timestep 3 (a NaN, here) has replaced 2 and kept 3, with the arrays that only params.npz held;
    the next run replaces it."""
    old = {t: open(f"{OUT}/timesteps/{t:06d}.npz", "rb").read() for t in range(4)}
    with np.load(f"{OUT}/params.npz") as f:
        old_3 = {k: f[k][3] for k in helpers.D3DGS_PER_TIMESTEP}
    real = train_d3dgs.train_timestep

    def nan_at_3(params, variables, optimizer, dataset, t, *rest):
        if t == 3:
            raise train_d3dgs.NonFiniteLoss("timestep 3, iteration 0: loss im is NaN/Inf")
        return real(params, variables, optimizer, dataset, t, *rest)

    monkeypatch.setattr(train_d3dgs, "train_timestep", nan_at_3)
    with pytest.raises(helpers.UserError, match="timestep 3"):
        train_d3dgs.main(STAGE1 + ["-f", "2"])
    replaced = f"{OUT}/timesteps/replaced"
    assert os.listdir(replaced) == ["000003.npz"]
    with np.load(f"{replaced}/000003.npz") as f, np.load(io.BytesIO(old[3])) as before:
        assert "in_params" in before.files and str(f["record"]) == str(before["record"])
        assert all(np.array_equal(f[k], old_3[k]) for k in helpers.D3DGS_PER_TIMESTEP)
    assert [open(f"{OUT}/timesteps/{t:06d}.npz", "rb").read() == old[t] for t in range(3)] == [True, True, False]
    monkeypatch.setattr(train_d3dgs, "train_timestep", real)
    train_d3dgs.main(STAGE1)
    assert not os.path.exists(replaced)
    with np.load(f"{OUT}/params.npz") as f:
        assert f["means3D"].shape[0] == 4


# ---------------------------------------------------------------- 2. provenance


def test_another_sequence_of_the_same_name_is_refused(work):
    synthetic_sequence.generate("data/alt/syn", **TINY, seed=1)
    trained_on = json.load(open(f"{OUT}/timesteps/run.json"))["sequence"]["path"]
    refused(train_d3dgs.main, ["-s", "data/alt/syn", *STAGE1[2:]], "another sequence", trained_on)
    # the same sequence moved or copied elsewhere is the same: it resumes (nothing to train)
    shutil.copytree(SEQ, "data/copy/syn", copy_function=shutil.copy)  # new file times
    shutil.move(SEQ, "data/moved/syn")
    train_d3dgs.main(["-s", "data/moved/syn", *STAGE1[2:]])
    train_d3dgs.main(["-s", "data/copy/syn", *STAGE1[2:]])


def test_image_edited_after_stage1_is_named(work):
    """An image of timestep 2 edited (another size), or a mask of timestep 3 written again (the same
    size, a newer time), after stage 1 trained on them: stage 1 and the stages reading its outputs
    refuse, naming the file and the timestep to train from again; once retrained, all pass."""
    from PIL import Image

    image, mask = train_image(2), helpers.seg_path(SEQ, helpers.load_meta(SEQ, "train")["fn"][3][0])
    Image.new("RGB", (TINY["width"], TINY["height"]), (200, 30, 30)).save(image)
    refused(train_d3dgs.main, STAGE1, image, "timestep 2", "-f 2")
    refused(visualize_d3dgs.main, STAGE2, f"{OUT}/params.npz", image, "timestep 2", "-f 2")
    train_d3dgs.main(STAGE1 + ["-f", "2"])
    with open(mask, "rb") as f:
        data = f.read()
    with open(mask, "wb") as f:
        f.write(data)
    refused(train_d3dgs.main, STAGE1, mask, "timestep 3", "-f 3")
    refused(visualize_d3dgs.main, STAGE2, mask, "timestep 3")
    train_d3dgs.main(STAGE1 + ["-f", "3"])
    visualize_d3dgs.main(STAGE2)


def test_image_edited_after_the_timesteps_kept(work):
    """Stage 1 checks the timesteps it keeps, the later stages those of params.npz: an image of
    timestep 3 edited does not stop -f 3 nor the stages reading a params.npz of timesteps 0-2."""
    from PIL import Image

    train_d3dgs.main(STAGE1 + ["-f", "1", "-l", "2"])
    Image.new("RGB", (TINY["width"], TINY["height"]), (200, 30, 30)).save(train_image(3))
    visualize_d3dgs.main(STAGE2)
    train_d3dgs.main(STAGE1 + ["-f", "3"])


def test_run_json_of_the_first_record_version_is_checked_as_before(work):
    """A timesteps/run.json written before the record covered every timestep ('seq', 'content': the
    metas, init_pt_cld.npz and the image sizes of timestep 0) is accepted while those match, and
    refused once they do not; a copy of the sequence (new file times) is the same sequence."""
    from PIL import Image

    run = json.load(open(f"{OUT}/timesteps/run.json"))
    metas = [helpers.load_meta(SEQ, "train"), helpers.load_meta(SEQ, "test")]
    items = [open(os.path.join(SEQ, n), "rb").read() for n in ("train_meta.json", "test_meta.json", "init_pt_cld.npz")]
    items += [[os.path.getsize(os.path.join(SEQ, "ims", fn)) for fn in meta["fn"][0]] for meta in metas]
    first = {"seq": os.path.abspath(SEQ), "content": helpers.fingerprint(*items), "downscale": 1}
    with open(f"{OUT}/timesteps/run.json", "w") as f:
        json.dump({**first, "train_cameras": run["train_cameras"], "test_cameras": run["test_cameras"]}, f)
    visualize_d3dgs.main(STAGE2)
    shutil.copytree(SEQ, "data/copy/syn", copy_function=shutil.copy)  # a copy without the file times
    visualize_d3dgs.main(["-s", "data/copy/syn", *STAGE2[2:]])
    Image.new("RGB", (TINY["width"], TINY["height"]), (200, 30, 30)).save(train_image(0))
    refused(visualize_d3dgs.main, STAGE2, f"{OUT}/params.npz", "before its metas, init_pt_cld.npz or images changed")
    refused(train_d3dgs.main, STAGE1, "before its metas", "-f 0")


def test_later_stages_on_another_sequence_of_the_same_name_are_refused(chain):
    """Stages 2, 5 and 6 read stage 1's params.npz by the sequence folder's name: another sequence in
    a folder of that name is refused, naming the one stage 1 was trained on."""
    synthetic_sequence.generate("data/alt/syn", **TINY, seed=1)
    trained_on = json.load(open(f"{OUT}/timesteps/run.json"))["sequence"]["path"]
    other = ["-s", "data/alt/syn"]
    refused(visualize_d3dgs.main, other + STAGE2[2:], "params.npz", "another sequence", trained_on)
    refused(train_4legs.main, other + STAGE5[2:], "params.npz", "another sequence", trained_on)
    refused(visualize_4legs.main, other + STAGE6[2:] + ["-p", "a red ball"], "params.npz", "another sequence")


def test_resume_with_another_downscale_is_refused(work):
    os.remove(f"{OUT}/timesteps/000003.npz")
    refused(train_d3dgs.main, STAGE1 + ["--downscale", "2"], "--downscale 1")


def test_missing_run_json_is_refused(work):
    os.remove(f"{OUT}/timesteps/000003.npz")
    os.remove(f"{OUT}/timesteps/run.json")
    refused(train_d3dgs.main, STAGE1, "run.json")


@pytest.mark.parametrize(
    "option, recorded",
    [
        (["--iters", "2"], "with --iters 1"),
        (["--iters-first", "4"], "with --iters-first 3"),
        (["--seed", "7"], "with --seed 0"),
        (["--motion-lr-scale", "2"], "with --motion-lr-scale 1.0"),
        (["--plateau", "0.1"], "with --plateau 0.005"),
        (["--max-gaussians", "3000"], "with --max-gaussians 2000"),
    ],
)
def test_stage1_resume_with_other_training_settings_is_refused(work, option, recorded):
    """Stage 1 continued with other training settings than its finished timesteps were trained with
    would mix two trainings in one params.npz: refused before anything changes, naming the timestep's
    file, the value to resume with and the -f that goes on with the new settings."""
    os.remove(f"{OUT}/timesteps/000003.npz")
    refused(train_d3dgs.main, STAGE1 + option, "000002.npz", recorded, "-f 3")


def test_stage1_goes_on_with_new_settings_from_the_timestep_given(work):
    """-f N keeps timesteps 0..N-1 as they were trained and trains from N on with the settings given,
    which their records then hold; resuming with those is accepted."""
    os.remove(f"{OUT}/timesteps/000003.npz")
    train_d3dgs.main(STAGE1 + ["--seed", "7", "-f", "3"])
    records = [json.loads(str(np.load(f"{OUT}/timesteps/{t:06d}.npz")["record"])) for t in range(4)]
    assert [r["settings"]["seed"] for r in records] == [0, 0, 0, 7]
    os.remove(f"{OUT}/timesteps/000003.npz")
    train_d3dgs.main(STAGE1 + ["--seed", "0"])


def test_stage5_after_stage1_retrained_and_resume_with_another_downscale(chain):
    refused(train_4legs.main, STAGE5 + ["--downscale", "2"], "000000.pt", "--downscale 1")
    train_d3dgs.main(STAGE1 + ["-f", "3", "--seed", "7"])
    again = "stage 1 trained this timestep again"
    refused(train_4legs.main, STAGE5, "000003.pt", again, "--restart -f 3")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a red ball"], "000003.pt", again)


def test_stage5_again_leaves_no_stale_warm_start_state(chain):
    """The warm-start state of a timestep trained again is stale (another run_id): only the last
    trained timestep's state stays in legs/."""
    shutil.rmtree(f"{OUT}/legs")
    train_4legs.main(STAGE5 + ["-l", "1"])
    assert sorted(f for f in os.listdir(f"{OUT}/legs") if f.startswith("state")) == ["state_000001.pt"]
    train_4legs.main(STAGE5 + ["--restart"])
    assert sorted(f for f in os.listdir(f"{OUT}/legs") if f.startswith("state")) == ["state_000003.pt"]


def test_a_sequence_run_on_to_later_timesteps_keeps_what_it_finished(tmp_path, monkeypatch, capsys):
    """Stages 1 and 3 run on (-l) rewrite params.npz and add cached timesteps, but change nothing of
    the earlier timesteps: stage 4 --resume (as run_all.sh runs it) keeps its autoencoder, stage 5 its
    records, and trains the new timesteps alone."""
    monkeypatch.chdir(tmp_path)
    synthetic_sequence.generate(SEQ, **TINY)
    train_d3dgs.main(STAGE1 + ["-l", "1"])
    extract_features.main(STAGE3 + ["-l", "1"])
    train_autoencoder.main(STAGE4 + ["--resume"])
    train_4legs.main(STAGE5)
    first = [os.stat(f"{OUT}/legs/{t:06d}.pt").st_mtime_ns for t in (0, 1)]
    train_d3dgs.main(STAGE1)
    extract_features.main(STAGE3)
    capsys.readouterr()
    train_autoencoder.main(STAGE4 + ["--resume"])
    assert "timesteps 0-1, whose features are cached as they were: kept (--resume); to train it on timesteps 2-3" in (
        capsys.readouterr().out
    )
    train_4legs.main(STAGE5)
    assert "2 timesteps trained, 2 already done" in capsys.readouterr().out
    assert [os.stat(f"{OUT}/legs/{t:06d}.pt").st_mtime_ns for t in (0, 1)] == first


@pytest.mark.parametrize(
    "option, recorded",
    [
        (["--iters", "3"], "with --iters 2"),
        (["--warm-iters", "2"], "with --warm-iters 1"),
        (["--warm-min-iters", "5"], "with --warm-min-iters 100"),
        (["--converge-window", "5"], "with --converge-window 50"),
        (["--converge-tol", "0.5"], "with --converge-tol 0.01"),
        (["--fixed-iters"], "without --fixed-iters"),
        (["--lr-features", "0.01"], "with --lr-features 0.0025"),
        (["--lr-attention", "0.01"], "with --lr-attention 0.00016"),
        (["--seed", "1"], "with --seed 0"),
    ],
)
def test_stage5_resume_with_other_training_settings_is_refused(chain, option, recorded):
    """Stage 5 resumed with other training settings than its finished timesteps were trained with
    would mix two trainings in legs/: refused, naming the setting, the value to resume with and the
    --restart that trains them again. Finished timesteps outside -f..-l count too: they stay."""
    os.remove(f"{OUT}/legs/000003.pt")
    refused(
        train_4legs.main,
        STAGE5 + option,
        "000000.pt",
        f"trained {recorded}, not",
        f"resume {recorded}",
        "--restart -f 0",
    )
    refused(train_4legs.main, STAGE5 + option + ["-f", "3", "--restart"], "000000.pt", f"resume {recorded}")


def test_stage5_settings_are_recorded_and_restart_trains_with_new_ones(chain):
    legs = f"{OUT}/legs"
    os.remove(f"{legs}/000003.pt")
    train_4legs.main(STAGE5)  # the same settings: resumed
    train_4legs.main(STAGE5 + ["--warm-iters", "2", "--restart"])  # every timestep with new settings
    records = [torch.load(f"{legs}/{t:06d}.pt", weights_only=True) for t in range(4)]
    assert [r["settings"]["warm_iters"] for r in records] == [2] * 4
    assert [r["warm_start"] for r in records] == [False, True, True, True] and records[3]["iterations"] == 2
    del records[0]["settings"]  # as stage 5 wrote it before the settings were recorded: taken as it is
    torch.save(records[0], f"{legs}/000000.pt")
    train_4legs.main(STAGE5 + ["--warm-iters", "2"])


def test_stage5_keeps_the_background_of_each_finished_timestep(chain):
    """A warm-started timestep stores its foreground's features alone and reads the background's from
    its chain's first timestep (relevancy.save_legs): a run that would train that one again but not
    it, or a resume after that one was deleted, is refused before training, naming the -f from there."""
    refused(
        train_4legs.main,
        STAGE5 + ["--restart", "-l", "1"],
        "000002.pt",
        "timestep 0, which this run trains again",
        "--restart -f 0",
    )
    os.remove(f"{OUT}/legs/000000.pt")
    refused(train_4legs.main, STAGE5, "000001.pt", "timestep 0, which was deleted", "-f 0 --restart")


def test_stage5_after_stage3_recomputed_is_refused(chain):
    from PIL import Image

    Image.new("RGB", (32, 18), (200, 30, 30)).save(train_image(3))
    train_d3dgs.main(STAGE1 + ["-f", "3"])  # else the later stages refuse stage 1 as made from the old image
    extract_features.main(STAGE3 + ["-f", "3"])  # timestep 3 of the features computed again
    refused(train_4legs.main, STAGE5, f"{SEQ}/ae/best_ckpt.pth", "run stage 4")


def test_shared_cache_dir_of_another_sequence_is_refused(chain):
    shutil.copytree(f"{SEQ}/interpolators", "data/cache/interpolators")  # as if extracted with --cache-dir
    features_of = json.load(open("data/cache/interpolators/color/sequence.json"))["path"]
    synthetic_sequence.generate("data/other", **TINY, seed=2)
    refused(
        extract_features.main,
        ["-s", "data/other", *STAGE3[2:], "--cache-dir", "data/cache"],
        "data/cache/interpolators/color",
        "another sequence",
        features_of,
    )


def test_stage2_records_what_its_videos_were_made_from(work):
    visualize_d3dgs.main(STAGE2)
    videos = json.load(open(f"results/{EXP}/syn/videos.json"))
    assert set(videos) == {"test_cam0.mp4", "orbit.mp4"}
    assert videos["orbit.mp4"]["params"] == helpers.d3dgs_identity(f"{OUT}/params.npz")
    assert videos["orbit.mp4"]["downscale"] == 1 and videos["orbit.mp4"]["sequence"] == os.path.abspath(SEQ)


# ---------------------------------------------------------------- 3. one run per experiment and stage


def test_second_run_names_the_holder_and_exits(work):
    with helpers.stage_lock(OUT, "train_d3dgs"):
        message = refused(train_d3dgs.main, STAGE1, OUT, "in use", f"pid {os.getpid()}", socket.gethostname())
    assert "since" in message
    # as a new user sees it: one line on stderr, exit code 2
    with helpers.stage_lock(OUT, "train_d3dgs"):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train_d3dgs.py"), *STAGE1],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and f"pid {os.getpid()}" in result.stderr


def test_lock_of_a_dead_run_is_taken_over(work, capsys):
    with open(f"{OUT}/.lock_train_d3dgs", "w") as f:
        json.dump({"pid": dead_pid(), "process_start": 1, "host": socket.gethostname(), "started": "then"}, f)
    train_d3dgs.main(STAGE1)  # nothing to train: it reassembles
    assert "taking over" in capsys.readouterr().err
    assert not os.path.exists(f"{OUT}/.lock_train_d3dgs")
    with open(f"{OUT}/.lock_train_d3dgs", "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "started": "then"}, f)
    refused(train_d3dgs.main, STAGE1, "another host", f"{OUT}/.lock_train_d3dgs")


def test_stage3_lock_and_temporary_folders_of_a_live_run(chain):
    cache = f"{SEQ}/interpolators/color"
    with helpers.stage_lock(cache, "extract_features"):
        refused(extract_features.main, STAGE3, cache, "in use")
    live = helpers.tmp_path(cache, "_timestep_0")  # this process: a live run
    dead = os.path.join(cache, f".tmp_{helpers.host_tag()}-{dead_pid()}-1-0000_timestep_0")
    os.makedirs(live)
    os.makedirs(dead)
    shutil.rmtree(f"{cache}/timestep_1")
    extract_features.main(STAGE3)
    assert os.path.isdir(live) and not os.path.exists(dead)


TORCHRUN = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
HOLD = """import sys, helpers
with helpers.stage_lock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def held_elsewhere(folder, name, **env):
    """The lock `name` of `folder` held by another live process, with `env` added to its environment
    (a torchrun rank's), while the block runs; yields the process (it lets go when the block ends)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, folder, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait()


def as_rank(monkeypatch, env):
    """This process a torchrun rank with the environment `env` from now on; env None: a plain run."""
    for key in ("RANK", *TORCHRUN):
        if env is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, env[key])


def test_plain_and_torchrun_runs_exclude_each_other(chain, monkeypatch):
    """A torchrun job's ranks share a stage's lock, and nothing else does: a plain run is refused
    while a rank holds it, a rank while a plain run or a rank of another job does; a rank of the
    same job joins unless its rank is taken. A rank killed with SIGKILL leaves a lock that the next run takes over."""
    cache, legs = f"{SEQ}/interpolators/color", f"{OUT}/legs"
    rank0, other_job = {**TORCHRUN, "RANK": "0"}, {**TORCHRUN, "RANK": "0", "MASTER_PORT": "29501"}
    with held_elsewhere(cache, "extract_features", **TORCHRUN, RANK="1") as rank1:
        refused(extract_features.main, STAGE3, cache, "in use", f"pid {rank1.pid}", "torchrun rank 1")
        as_rank(monkeypatch, other_job)
        refused(extract_features.main, STAGE3, cache, "in use", f"pid {rank1.pid}")
        as_rank(monkeypatch, {**TORCHRUN, "RANK": "1"})  # a second rank 1: another set of ranks started by hand
        refused(extract_features.main, STAGE3, cache, "in use", f"pid {rank1.pid}", "torchrun rank 1")
        as_rank(monkeypatch, rank0)
        extract_features.main(STAGE3)  # timesteps 0-1, cached: nothing to do
        lock = json.load(open(f"{cache}/.lock_extract_features"))
        assert [h["pid"] for h in lock["holders"]] == [rank1.pid]  # rank 0 has let go, rank 1 holds on
        as_rank(monkeypatch, None)
        refused(extract_features.main, STAGE3, cache, "in use", f"pid {rank1.pid}")
        rank1.kill()
    extract_features.main(STAGE3)  # the lock of the killed rank is taken over
    assert not os.path.exists(f"{cache}/.lock_extract_features")
    with held_elsewhere(legs, "train_4legs") as plain:
        as_rank(monkeypatch, rank0)
        refused(train_4legs.main, STAGE5, legs, "in use", f"pid {plain.pid}")
    as_rank(monkeypatch, None)
    with held_elsewhere(cache, "extract_features") as plain:  # as a user sees it: one line on stderr, exit code 2
        run = subprocess.run(
            [sys.executable, os.path.join(ROOT, "extract_features.py"), *STAGE3],
            capture_output=True,
            text=True,
            env={**os.environ, **rank0, "PYTHONPATH": ROOT},
        )
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"in use by another extract_features run (pid {plain.pid}" in run.stderr, run.stderr


def test_stale_temporary_files_are_cleaned_when_a_stage_starts(chain):
    """Temporary files of a SIGKILLed run in folders that a stage with nothing to do does not write
    again (stage 5's legs/, a folder under stage 1's outputs) go when the stage starts, under its
    lock; a live run's stay."""
    folders = [f"{OUT}/legs", f"{OUT}/timesteps/replaced"]
    os.makedirs(folders[1])
    dead = [os.path.join(f, f".tmp_{helpers.host_tag()}-{dead_pid()}-1-0000.pt") for f in folders]
    live = [helpers.tmp_path(f, ".pt") for f in folders]  # this process: a live run
    for path in dead + live:
        with open(path, "wb") as f:
            f.write(b"half")
    train_4legs.main(STAGE5)
    train_d3dgs.main(STAGE1)
    assert [os.path.exists(p) for p in dead + live] == [False, False, True, True]


# ---------------------------------------------------------------- 4. prompts

BAD_PROMPTS = ["/tmp/x", "../../../x", ".", "a green top", "a_green_top", "-rf", " ".join(["word"] * 70)]


def test_prompt_folders_are_safe_and_unique():
    names = [prompt_dir(p) for p in BAD_PROMPTS]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and name not in (".", "..") and not name.startswith(("-", ".")) and len(name) <= 100
    assert prompt_dir("a green top") == "a_green_top"  # as the original and the benchmark spell it
    assert len({prompt_dir(p) for p in ("..", "../..", "a  green top", "a green top ")}) == 4


def test_prompts_stay_under_results_with_their_exact_text(chain, tmp_path):
    os.makedirs(f"results/{EXP}/syn", exist_ok=True)
    with open(f"results/{EXP}/syn/orbit.mp4", "wb") as f:  # stage 2's video, which -p . must not touch
        f.write(b"stage 2")
    prompts = [str(tmp_path / "absolute")] + BAD_PROMPTS[1:]  # an absolute path that the test can watch
    outside, here = sorted(os.listdir(tmp_path)), sorted(os.listdir("."))
    visualize_4legs.main(STAGE6 + [f"--prompt={p}" for p in prompts])  # -p -rf would be an option
    assert sorted(os.listdir(tmp_path)) == outside and sorted(os.listdir(".")) == here
    assert open(f"results/{EXP}/syn/orbit.mp4", "rb").read() == b"stage 2"
    assert len(os.listdir(f"results/{EXP}/syn")) == len(prompts) + 1
    for prompt in prompts:
        timeline = json.load(open(f"results/{EXP}/syn/{prompt_dir(prompt)}/timeline.json"))
        assert timeline["prompt"] == prompt
    made_from = timeline["made_from"]  # what the timelines were made from
    assert made_from["params"] == helpers.d3dgs_identity(f"{OUT}/params.npz")
    assert made_from["autoencoder"]["run_id"] and made_from["legs"]["fingerprint"]


def test_prompts_are_checked_before_rendering(chain):
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball", "-p", "a ball"], "'a ball'", "a_ball")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball", "-p", " "], "empty prompt")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball", "-e", "../../x"], "-e '../../x'")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball", "-e", "/tmp/x"], "-e '/tmp/x'")


# ---------------------------------------------------------------- 5. non-finite data


def test_params_with_nan(chain):
    put_nan(f"{OUT}/params.npz", "means3D")
    refused(visualize_d3dgs.main, STAGE2, f"{OUT}/params.npz", "means3D", "NaN")
    refused(train_4legs.main, STAGE5 + ["--restart"], f"{OUT}/params.npz", "means3D", "NaN")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball"], f"{OUT}/params.npz", "NaN")


def test_damaged_cached_level_is_computed_again(chain, capsys):
    """The damaged timestep is computed again, with the later ones that reuse its embeddings."""
    cache = f"{SEQ}/interpolators/color"
    level = f"{cache}/timestep_2/level_2.npy"
    later = [int(d.split("_")[1]) for d in os.listdir(cache) if d.startswith("timestep_") and int(d.split("_")[1]) > 2]
    sourcing = [t for t in later if "2" in helpers.read_json(f"{cache}/timestep_{t}/config.json").get("sources", {})]
    truncate(level)
    extract_features.main(STAGE3)
    out = capsys.readouterr().out
    assert f"{level} is damaged" in out and f"embedded {1 + len(sourcing)} timestep(s)" in out
    np.load(level)  # whole again
    with open(level.replace(".npy", "_scales.npy"), "r+b") as f:  # right size, a NaN: found where it is read
        f.seek(-4, os.SEEK_END)
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    refused(train_autoencoder.main, STAGE4, f"{SEQ}/interpolators/color/timestep_2", "NaN")


def test_init_point_cloud_with_bad_seg_nan_or_truncated(work):
    cloud = f"{SEQ}/init_pt_cld.npz"
    with np.load(cloud) as f:
        data = f["data"]
    np.savez(cloud, data=np.concatenate([data[:, :6], np.full((len(data), 1), 5.0)], 1))
    refused(train_d3dgs.main, STAGE1 + ["-f", "0"], cloud, "seg", "5")
    np.savez(cloud, data=np.where(np.arange(data.size).reshape(data.shape) == 0, np.nan, data))
    refused(train_d3dgs.main, STAGE1 + ["-f", "0"], cloud, "NaN")
    np.savez(cloud, data=data)
    truncate(cloud)
    refused(train_d3dgs.main, STAGE1 + ["-f", "0"], cloud, "BadZipFile")
    np.savez(cloud, points=data)
    refused(train_d3dgs.main, STAGE1 + ["-f", "0"], cloud, "'data' is missing")


# ---------------------------------------------------------------- 6. tracebacks that became one line


def test_truncated_outputs(chain):
    truncate(f"{OUT}/legs/000001.pt")
    refused(train_4legs.main, STAGE5, f"{OUT}/legs/000001.pt", "--restart")
    refused(visualize_4legs.main, STAGE6 + ["-p", "a ball"], f"{OUT}/legs/000001.pt")
    truncate(f"{OUT}/params.npz")
    refused(visualize_d3dgs.main, STAGE2, f"{OUT}/params.npz", "BadZipFile")
    refused(train_4legs.main, STAGE5, f"{OUT}/params.npz", "BadZipFile")


def test_truncated_timestep_file_at_reassembly(work):
    truncate(f"{OUT}/timesteps/000002.npz")
    refused(train_d3dgs.main, STAGE1 + ["-l", "1"], "000002.npz", "-f 2", may_change=[f"./{OUT}/timesteps/run.json"])


@pytest.mark.parametrize(
    "script, argv, option",
    [
        (train_d3dgs, STAGE1 + ["--downscale", "1000"], "--downscale 1000"),
        (train_d3dgs, STAGE1 + ["--downscale", "0"], "--downscale 0"),
        (train_d3dgs, STAGE1 + ["--motion-lr-scale", "nan"], "--motion-lr-scale nan"),
        (train_d3dgs, STAGE1 + ["--plateau", "1"], "--plateau 1.0"),
        (train_d3dgs, STAGE1 + ["--plateau", "-0.01"], "--plateau -0.01"),
        (train_d3dgs, STAGE1 + ["--device", "tpu"], "--device tpu"),
        (train_d3dgs, STAGE1 + ["--device", "meta"], "--device meta"),
        (train_d3dgs, STAGE1 + ["-e", "../x"], "-e '../x'"),
        (visualize_d3dgs, STAGE2 + ["--downscale", "0"], "--downscale 0"),
        (visualize_d3dgs, STAGE2 + ["--downscale", "-2"], "--downscale -2"),
        (visualize_d3dgs, STAGE2 + ["--downscale", "1000"], "--downscale 1000"),
        (visualize_d3dgs, STAGE2 + ["--train-cams", "-1"], "--train-cams -1"),
        (visualize_d3dgs, STAGE2 + ["--fps", "-5"], "--fps -5"),
        (visualize_d3dgs, STAGE2 + ["--fps", "0"], "--fps 0"),
        (visualize_d3dgs, STAGE2 + ["--device", "tpu"], "--device tpu"),
        (extract_features, STAGE3 + ["--batch-size", "0"], "--batch-size 0"),
        (train_4legs, STAGE5 + ["--downscale", "1000"], "--downscale 1000"),
        (train_4legs, STAGE5 + ["--lr-features", "nan"], "--lr-features nan"),
        (visualize_4legs, STAGE6 + ["-p", "a ball", "--threshold", "-1"], "--threshold -1"),
        (visualize_4legs, STAGE6 + ["-p", "a ball", "--threshold", "0.5"], "--threshold 0.5"),
        (visualize_4legs, STAGE6 + ["-p", "a ball", "--fps", "0"], "--fps 0"),
        (visualize_4legs, STAGE6 + ["-p", "a ball", "--relevancy-stride", "0"], "--relevancy-stride 0"),
        (evaluate_grounding, STAGE6[:-2] + ["--benchmark", "data/none", "--threshold", "-1"], "--threshold -1"),
    ],
)
def test_bad_values_are_one_line(chain, script, argv, option):
    refused(script.main, argv, option)


def test_grounding_report_stays_under_results_or_output(tmp_path, monkeypatch):
    """--out is checked with the other options, before any stage's output is read."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(SEQ)
    os.makedirs("results")
    os.symlink(tmp_path.parent, "results/link")
    argv = STAGE6[:-2] + ["--benchmark", "data/none", "--out"]
    for out in (
        str(tmp_path.parent / "x.json"),
        "../x.json",
        "results/../x.json",
        "data/x.json",
        "results",
        "results/link/x.json",
        "output",
    ):
        refused(evaluate_grounding.parse_args, argv + [out], f"--out {out}", "under results/ or output/")
    for out in ("results/x/grounding.json", "output/x.json", str(tmp_path / "results" / "x.json")):
        assert evaluate_grounding.parse_args(argv + [out]).out == out


@pytest.mark.parametrize(
    "script, argv",
    [
        (point_cloud, ["-s", SEQ, "-o"]),
        (prepare_sequence, ["--videos", "videos", "--cameras", "cameras.json", "-o"]),
        (synthetic_sequence, ["--out"]),
        (synthetic_sequence, ["--benchmark"]),
        (synthetic_sequence, ["--video-dir"]),
        (extract_features, STAGE3 + ["--cache-dir"]),
    ],
)
def test_outputs_stay_under_data_output_or_results(tmp_path, monkeypatch, script, argv):
    """Every output path a user gives is checked before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(SEQ)
    os.symlink(tmp_path.parent, "data/link")
    option = argv[-1]
    for out in (str(tmp_path.parent / "x"), "../x", "data/../x", "x", "data", "results", "data/link/x"):
        refused(script.main, argv + [out], f"{option} {out}", "under data/, output/ or results/")


def test_point_cloud_of_a_sequence_outside_data_needs_an_output(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "seq")
    os.makedirs(tmp_path / "work")
    monkeypatch.chdir(tmp_path / "work")
    refused(
        point_cloud.main,
        ["-s", str(tmp_path / "seq")],
        "-o (default <seq>/init_pt_cld.npz)",
        f"{tmp_path / 'seq' / 'init_pt_cld.npz'}",
        "e.g. -o data/seq/init_pt_cld.npz",
    )
    refused(point_cloud.main, ["-s", str(tmp_path / "seq"), "-o", "data/seq/init_pt_cld.npz"], "train_meta.json")
    for folder in ("data/x", "output/x/y", "results/x"):
        helpers.check_output("-o", folder, "-o data/x", folder=True)


def test_open_clip_checkpoint_that_is_not_one(chain):
    pytest.importorskip("open_clip")
    with open("not_a_checkpoint.pt", "wb") as f:
        f.write(b"hello")
    refused(
        extract_features.main,
        STAGE3[:2] + ["--encoder", "openclip:ViT-B-32:not_a_checkpoint.pt", "--device", "cpu"],
        "not_a_checkpoint.pt",
        "open_clip could not load it",
    )


def test_unwritable_sequence_folder_and_cache_dir(chain):
    # as root, who may write anywhere, too: a file where the cache folder goes (test_read_only_sequence_folder chmods)
    shutil.copytree(f"{SEQ}/interpolators", "data/cache/interpolators")  # stage 3 finds them done there
    shutil.rmtree(f"{SEQ}/interpolators")
    with open(f"{SEQ}/interpolators", "w") as f:
        f.write("in the way")
    refused(extract_features.main, STAGE3, f"{SEQ}/interpolators/color", "--cache-dir")
    shutil.rmtree(f"{SEQ}/ae")
    with open(f"{SEQ}/ae", "w") as f:
        f.write("in the way")
    elsewhere = ["--cache-dir", "data/cache"]
    extract_features.main(STAGE3 + elsewhere)
    train_autoencoder.main(STAGE4 + elsewhere)
    assert os.path.isfile("data/cache/ae/best_ckpt.pth")
    # stage 5 reads the autoencoder there: its finished timesteps were made with the other one
    refused(train_4legs.main, STAGE5 + elsewhere, "000000.pt", "another autoencoder")


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root writes into read-only folders (CI runs the tests as root): run them as another user "
    "for this test; test_unwritable_sequence_folder_and_cache_dir stands in",
)
def test_read_only_sequence_folder(chain):
    """A sequence folder that cannot be written (chmod a-w): stages 3 and 4 say so in one line naming
    --cache-dir, and run with it, as do stages 5 and 6; stage 1 writes nothing there."""
    shutil.rmtree(f"{SEQ}/ae")
    for folder, _, _ in os.walk(SEQ):
        os.chmod(folder, 0o555)
    try:
        refused(extract_features.main, STAGE3, f"{SEQ}/interpolators/color", "Permission denied", "--cache-dir")
        refused(train_autoencoder.main, STAGE4, f"{SEQ}/ae", "Permission denied", "--cache-dir")
        elsewhere = ["--cache-dir", "data/cache"]
        extract_features.main(STAGE3 + elsewhere)
        train_autoencoder.main(STAGE4 + elsewhere)
        train_4legs.main(STAGE5 + elsewhere + ["--restart"])
        visualize_4legs.main(STAGE6 + elsewhere + ["-p", "a ball"])
        train_d3dgs.main(STAGE1)
    finally:
        for folder, _, _ in os.walk(SEQ):
            os.chmod(folder, 0o755)
    assert os.path.isfile("data/cache/ae/best_ckpt.pth") and os.path.isfile(f"results/{EXP}/syn/a_ball/timeline.json")


def test_encoder_suggestions_are_what_stage3_takes(chain):
    spec = "openclip:ViT-B-32:random"
    message = refused(train_autoencoder.main, STAGE4[:2] + ["--encoder", spec], f"--encoder {spec}")
    assert "--encoder openclip-ViT-B-32" not in message
    ckpt = torch.load(f"{SEQ}/ae/best_ckpt.pth", weights_only=True)
    ckpt.update(encoder="openclip-ViT-B-32", encoder_spec=spec)
    torch.save(ckpt, f"{SEQ}/ae/best_ckpt.pth")
    refused(train_4legs.main, STAGE5, f"pass --encoder {spec}")


def test_visualisers_do_not_claim_to_resume(capsys):
    def interrupted():
        raise KeyboardInterrupt

    for resumes, says in ((False, "renders all of them"), (True, "to resume")):
        with pytest.raises(SystemExit) as code:
            helpers.run_main(interrupted, resumes=resumes)
        assert code.value.code == 130 and says in capsys.readouterr().err
    for script in ("visualize_d3dgs.py", "visualize_4legs.py"):
        assert "helpers.run_main(main, resumes=False)" in open(os.path.join(ROOT, script)).read()


# ---------------------------------------------------------------- 7. writing


def test_atomic_write_flushes_file_then_folder(tmp_path, monkeypatch):
    flushed = []
    real = helpers.fsync
    monkeypatch.setattr(helpers, "fsync", lambda path: (flushed.append(os.path.basename(path)), real(path)))
    helpers.save_json(tmp_path / "out" / "a.json", {"a": 1})
    assert flushed[0].startswith(".tmp_") and flushed[1:] == ["out"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_umask_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        helpers.save_npz(tmp_path / "a.npz", {"x": np.zeros(2)})
        helpers.write_video(tmp_path / "a.mp4", [np.zeros((4, 4, 3), np.uint8)] * 2)
    finally:
        os.umask(old)
    assert {os.stat(tmp_path / n).st_mode & 0o777 for n in ("a.npz", "a.mp4")} == {mode}


def test_stale_temporary_files_are_cleaned_safely(tmp_path):
    dead = tmp_path / f".tmp_{helpers.host_tag()}-{dead_pid()}-1-0000.npz"  # a SIGKILLed run's
    live = tmp_path / os.path.basename(helpers.tmp_path(tmp_path, ".npz"))  # this live process's
    old_foreign, new_foreign = tmp_path / ".tmp_ffffff-1-1-0000.npz", tmp_path / ".tmp_ffffff-2-1-0000.npz"
    for path in (dead, live, old_foreign, new_foreign):
        path.write_bytes(b"half")
    day_ago = time.time() - helpers.STALE_TMP_SECONDS - 60
    os.utime(old_foreign, (day_ago, day_ago))
    helpers.save_json(tmp_path / "a.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", live.name, new_foreign.name])


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "-s SEQ is required"),
        (
            ["-s", "no_such_sequence"],
            "-s no_such_sequence: neither no_such_sequence nor data/no_such_sequence is a folder",
        ),
        (["-s", "x", "--frobnicate"], "unknown option --frobnicate"),
    ],
)
def test_run_all_refuses_bad_options_in_one_line(tmp_path, args, message):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_all.sh")
    run = subprocess.run(["bash", script, *args], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and message in run.stderr, run.stderr
    assert not os.listdir(tmp_path)  # nothing written


def test_run_all_shows_what_finished_when_a_stage_fails(tmp_path):
    """A stage that fails stops run_all.sh with its exit status, after the table of the stages that
    finished (their time and disk) and one line saying which stage failed and that a rerun resumes."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_all.sh")
    fake = tmp_path / "python"  # stage 1 succeeds, stage 2 fails with status 3
    fake.write_text('#!/bin/sh\ncase "$1" in *train_d3dgs.py) exit 0 ;; esac\necho "error: no videos" >&2\nexit 3\n')
    fake.chmod(0o755)
    (tmp_path / "seq").mkdir()
    run = subprocess.run(
        ["bash", script, "-s", "seq", "--python", str(fake)], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 3, run.stderr
    table = run.stdout.split("== time of this run per stage")[-1].splitlines()
    assert [line.rsplit(None, 2)[0] for line in table[2:]] == ["1 train_d3dgs", "all"], run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("run_all.sh: stage 2 visualize_d3dgs failed (exit 3)")


def test_a_video_without_imageio_ffmpeg_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed: importing it fails
    with pytest.raises(helpers.UserError, match="a.mp4: writing an mp4 needs the imageio-ffmpeg package"):
        helpers.write_video(tmp_path / "a.mp4", [np.zeros((4, 4, 3), np.uint8)] * 2)
    assert not os.listdir(tmp_path)
