"""Shared by the stage scripts: errors, data loading, cameras, geometry, losses, atomic output.

Conventions: cameras in the OpenCV convention of the PanopticSports data (+x right, +y down, +z
forward); quaternions (w, x, y, z); images float32 [3, H, W] in [0, 1].
"""

import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import time
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import torch
from diff_gaussian_rasterization import GaussianRasterizationSettings as Camera

DATA_DIR = "data"  # where `-s <name>` looks when <name> is no folder
PLAIN_PROGRESS_SECONDS = 30  # off a terminal: at most one progress line this often per loop
ORBIT_UP = (0.0, -1.0, 0.0)  # PanopticSports: +y points down, to the floor
MIN_DOWNSCALED_SIDE = 8  # pixels: the least --downscale may leave of an image's width or height
OUTPUT_ROOTS = (DATA_DIR, "output", "results")  # the only folders of the working directory written to
FOREGROUND_THRESHOLD = 0.5  # a Gaussian whose seg colour's first channel (foreground) is above this is foreground


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def run_main(main, resumes=True):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2. resumes: whether
    running the script again continues where an interrupted run stopped (the visualisers render
    everything again), which is what Ctrl-C's message says."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: finished steps are saved; run the same command again to resume"
            if resumes
            else "interrupted: the videos finished before are kept; running the command again renders all of them",
            file=sys.stderr,
        )
        sys.exit(130)


def pick_device(name=None):
    """'cuda' when available unless told otherwise; `name` (--device) is checked: cpu, cuda or cuda:N
    of a visible GPU."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this code runs on cpu or cuda (cuda:N), not on {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: {torch.cuda.device_count()} CUDA GPU(s) visible, cuda:0..{torch.cuda.device_count() - 1}"
        )
    return device


def check_option(args, dest, at_least=None, above=None, below=None):
    """Raise UserError naming --<dest> and its value unless it is a finite number >= at_least, >
    above and < below (each bound where given). An option left at a default of None passes."""
    value = getattr(args, dest)
    if value is None:
        return
    fits = (
        math.isfinite(value)
        and (at_least is None or value >= at_least)
        and (above is None or value > above)
        and (below is None or value < below)
    )
    if not fits:
        wanted = [
            f"at least {at_least}" if at_least is not None else "",
            f"above {above}" if above is not None else "",
            f"below {below}" if below is not None else "",
        ]
        raise UserError(f"--{dest.replace('_', '-')} {value}: must be a number {' and '.join(w for w in wanted if w)}")


def check_experiment(exp):
    """Raise UserError unless `exp` (-e) is a plain folder name: it becomes output/<exp>/ and
    results/<exp>/, and must not lead elsewhere ('../x', '/tmp/x', '.')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", exp):
        raise UserError(
            f"-e {exp!r}: an experiment name is a plain folder name (letters, digits, '.', '_', '-', "
            f"up to 100, no '/'), e.g. -e exp1"
        )


def check_output(option, path, example, roots=OUTPUT_ROOTS, folder=False):
    """Raise UserError unless `path`, the value of `option`, lies under one of the folders `roots`
    of the working directory once symbolic links and '..' are resolved (nothing is written anywhere
    else; a root itself is no output), and, for a file (folder=False), is no existing folder.
    `example` ends the message: what to give instead, e.g. '-o data/seq'."""
    target = os.path.realpath(path)
    inside = any(target != root and os.path.commonpath([target, root]) == root for root in map(os.path.realpath, roots))
    if not inside or (not folder and os.path.isdir(target)):
        places = ", ".join(f"{root}/" for root in roots[:-1]) + f" or {roots[-1]}/"
        raise UserError(
            f"{option} {path}: must be a {'folder' if folder else 'file'} under {places} of the "
            f"working directory {os.getcwd()} (links and '..' followed), e.g. {example}"
        )


def stage_dir(kind, exp, seq_dir):
    """<kind>/<exp>/<seq> ('output' or 'results'), <seq> the sequence folder's own name (of its
    absolute path, so that -s . or -s ../x name a folder, not a way out of <kind>/<exp>/)."""
    check_experiment(exp)
    return os.path.join(kind, exp, os.path.basename(os.path.abspath(seq_dir)))


def parse_with_demo(parser, argv, demo):
    """parser.parse_args(argv) with a --demo flag: `demo` ({dest: value}, the small settings `make
    demo` uses on 2 CPU cores) become the defaults; options given explicitly still win."""
    parser.add_argument(
        "--demo",
        action="store_true",
        help="small settings for `make demo` on 2 CPU cores: " + ", ".join(f"{k}={v}" for k, v in demo.items()),
    )
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**demo)
        args = parser.parse_args(argv)
    return args


# ---------------------------------------------------------------- the pipeline
# The one table of the six stages: README's table (stages_table), each script's --help
# (stage_description) and the errors that name a stage to run first (run_first) come from here.


class Stage(NamedTuple):
    number: int
    script: str
    title: str
    reads: str
    writes: str


STAGES = {
    stage.script: stage
    for stage in (
        Stage(
            1,
            "train_d3dgs.py",
            "Dynamic 3D Gaussians",
            "`<seq>/ims/`, `seg/`, `train_meta.json`, `test_meta.json`",
            "`output/<exp>/<seq>/params.npz`, `metrics.json`",
        ),
        Stage(
            2,
            "visualize_d3dgs.py",
            "videos of the reconstruction",
            "`output/<exp>/<seq>/params.npz`",
            "`results/<exp>/<seq>/*.mp4`",
        ),
        Stage(
            3,
            "extract_features.py",
            "video-language features of tile clips",
            "`<seq>/ims/`, `train_meta.json`",
            "`<seq>/interpolators/<encoder>/`",
        ),
        Stage(
            4,
            "train_autoencoder.py",
            "the 768 -> 128 autoencoder",
            "`<seq>/interpolators/<encoder>/`",
            "`<seq>/ae/best_ckpt.pth`",
        ),
        Stage(
            5,
            "train_4legs.py",
            "4-LEGS features on the Gaussians",
            "`params.npz`, `interpolators/<encoder>/`, `best_ckpt.pth`",
            "`output/<exp>/<seq>/legs/`",
        ),
        Stage(
            6,
            "visualize_4legs.py",
            "where and when a prompt happens",
            "`params.npz`, `legs/`, `best_ckpt.pth`",
            "`results/<exp>/<seq>/<prompt>/` (videos, `timeline.json`, `timeline.png`)",
        ),
    )
}


def stage_name(script):
    """'stage 5 (train_4legs.py)'."""
    return f"stage {STAGES[script].number} ({script})"


def stage_description(script):
    """The opening of a stage script's --help: its number, what it does, what it reads and writes."""
    stage = STAGES[script]
    return (
        f"Stage {stage.number} of {len(STAGES)}, {stage.title}. Reads {stage.reads}; writes {stage.writes}."
    ).replace("`", "")


def stage_help(script, doc):
    """--help of a stage script whose docstring is its help: stage_description, then the docstring
    after its first line (that line names the stage by hand; a test holds it to this table)."""
    return stage_description(script) + "\n\n" + doc.split("\n", 1)[1].strip("\n")


def run_first(script, command):
    """The end of an error about a missing output of `script`: which stage makes it, and how."""
    return f"run {stage_name(script)} first: {command}"


def stages_table():
    """The README's table of the stages (markdown)."""
    rows = [f"| {s.number} | `{s.script}` | {s.title} | {s.reads} | {s.writes} |" for s in STAGES.values()]
    return "\n".join(["| # | script | does | reads | writes |", "|---|---|---|---|---|", *rows])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where it has none: a required option (-s)
    or a default of None, whose help says what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def add_sequence_option(parser):
    """-s/--seq of every script; main() turns it into the folder with find_sequence."""
    parser.add_argument(
        "-s",
        "--seq",
        required=True,
        help=f"sequence folder (ims/, seg/, train_meta.json, test_meta.json), or its name under "
        f"{DATA_DIR}/: -s basketball reads {DATA_DIR}/basketball",
    )


def find_sequence(arg):
    """The sequence folder that `-s arg` names: `arg` when it is a folder, else data/<arg> (the
    original's `-s basketball` with the data under data/). Prints which folder is used."""
    for folder in (arg, os.path.join(DATA_DIR, arg)):
        if os.path.isdir(folder):
            folder = os.path.normpath(folder)
            print(f"sequence folder: {folder}")
            return folder
    raise UserError(
        f"-s {arg}: neither {arg} nor {os.path.join(DATA_DIR, arg)} is a folder; give the sequence "
        f"folder (ims/, seg/, train_meta.json, test_meta.json), e.g. -s data/basketball"
    )


# ---------------------------------------------------------------- progress

_TERMINAL_CONTROL = re.compile(r"\r|\x1b\[[0-9;]*[A-Za-z]")  # carriage returns, cursor moves of nested bars


class _PlainLines:
    """What tqdm writes to off a terminal: each redraw ('\\r' + bar) becomes one line, where the
    redraws would otherwise pile up as thousands of '\\r' (and nested bars' cursor moves) in a log file."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = _TERMINAL_CONTROL.sub("", text).rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, **options):
    """tqdm(iterable, **options) for every long loop: a bar on a terminal; elsewhere (a log file,
    CI) plain lines, the first after PLAIN_PROGRESS_SECONDS and then at most one that often (a
    loop shorter than that prints none)."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, **options)

    class PlainTqdm(tqdm):
        """Postfix changes wait for the next line: tqdm updates its count only when it prints, so a
        line printed for a postfix alone would show a stale count (epoch 0/10 at the seventh)."""

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            super().set_postfix(ordered_dict, refresh=False, **kwargs)

        def set_postfix_str(self, s="", refresh=True):
            super().set_postfix_str(s, refresh=False)

    # ncols=0: counts and rates without the bar; maxinterval too, else tqdm's monitor redraws every 10 s
    return PlainTqdm(
        iterable,
        file=_PlainLines(sys.stderr),
        ncols=0,
        delay=PLAIN_PROGRESS_SECONDS,
        mininterval=PLAIN_PROGRESS_SECONDS,
        maxinterval=PLAIN_PROGRESS_SECONDS,
        **options,
    )


# ---------------------------------------------------------------- atomic output

# Temporary files and folders are named .tmp_<host>-<pid>-<process start>-<random><suffix>: a later
# run tells a live writer's (left alone) from one a SIGKILL or power cut left (removed).

STALE_TMP_SECONDS = 24 * 3600  # another host's temporary file (its writer cannot be asked) this old is stale
_TMP_NAME = re.compile(r"\.tmp_([0-9a-f]{6})-(\d+)-(\d+)-")


def host_tag():
    """6 hex digits naming this host in temporary names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def process_start(pid):
    """When process `pid` started (clock ticks after boot, field 22 of /proc/<pid>/stat); None when
    it does not run or there is no /proc. With the pid it names one process: pids are reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid, start):
    """Whether the process `pid` of this host that started at `start` (process_start's) still runs."""
    if start is not None and os.path.isdir("/proc/self"):
        return process_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def tmp_path(folder, suffix=""):
    """A new temporary name in `folder` that names its writer, this process (see clean_stale_tmp)."""
    writer = f"{host_tag()}-{os.getpid()}-{process_start(os.getpid()) or 0}"
    return os.path.join(folder, f".tmp_{writer}-{secrets.token_hex(4)}{suffix}")


def clean_stale_tmp(folder):
    """Remove the temporary files and folders (tmp_path's) that killed runs left in `folder`: those
    of a dead process of this host, and those of other hosts older than STALE_TMP_SECONDS. Those of
    live runs stay."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if not name.startswith(".tmp_"):
            continue
        path, writer = os.path.join(folder, name), _TMP_NAME.match(name)
        try:
            if writer and writer[1] == host_tag():
                stale = not process_alive(int(writer[2]), int(writer[3]) or None)
            else:
                stale = time.time() - os.lstat(path).st_mtime > STALE_TMP_SECONDS
            if stale and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif stale:
                os.remove(path)
        except FileNotFoundError:  # another run removed it first
            pass


def clean_stale_tree(folder):
    """clean_stale_tmp in `folder` and in every folder under it, but inside temporary folders (what
    is there belongs to their writer)."""
    for parent, subfolders, _ in os.walk(folder):
        clean_stale_tmp(parent)
        subfolders[:] = [name for name in subfolders if not name.startswith(".tmp_")]


def fsync(path):
    """Flush a file, or a folder's entries (what was renamed into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some file systems cannot flush a folder: nothing to be done there
            raise
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call write(tmp_path) for a temporary file beside `path`, then rename it into place, so a
    reader never sees a half-written file and an interrupted run leaves the old one intact. The file
    and then its folder are flushed to the disk, so that a power cut keeps what was renamed into
    place. The file gets the mode the umask gives. Stale temporary files of killed runs in the
    folder go first. Raises UserError when the file cannot be written (permissions, disk full)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = tmp_path(folder, os.path.splitext(path)[1])  # keep the extension: np.savez and imageio look at it
    try:
        os.makedirs(folder, exist_ok=True)
        clean_stale_tmp(folder)
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(folder)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); make room or give a writable place") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_npz(path, arrays):
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def lap(phases, name, since, device):
    """phases[name] = seconds from `since` (time.time()) until the device's queued work is done;
    returns that moment (one synchronisation: for phases of seconds, not for a training loop)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    now = time.time()
    phases[name] = now - since
    return now


def save_torch(path, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def quantize_rows(x):
    """x [N, D] float -> (int8 [N, D], scales float32 [N]), x ~ values * scales[:, None]: each row
    scaled by its largest magnitude / 127, so a row's error is at most half a step of its own scale
    (how the stored features and embeddings keep a quarter of float32's bytes)."""
    x = torch.as_tensor(x).float()
    scales = x.abs().amax(1) / 127.0
    values = torch.round(x / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return values.to(torch.int8), scales


def dequantize_rows(values, scales):
    """quantize_rows's (int8 [N, D], scales [N]) -> float32 [N, D]."""
    return values.float() * scales.float()[:, None]


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def read_json(path):
    """A JSON file we wrote (a provenance record), or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- one run per experiment and stage


def torchrun_job():
    """What names the torchrun job this process is a rank of, None for a plain run (WORLD_SIZE 1 or
    unset): the rendezvous address, port and run id, and the world size, which every rank of a job
    is given alike and two jobs running at once cannot share (the port is bound)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    return " ".join(
        f"{k}={os.environ.get(k, '')}" for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "WORLD_SIZE")
    )


@contextlib.contextmanager
def stage_lock(folder, name, unwritable_hint=""):
    """Hold the lock file <folder>/.lock_<name> while the block runs, so that two runs of one stage
    on one experiment cannot mix their outputs. It lists its holders (pid, host, start time,
    command; under torchrun the rank): the ranks of one torchrun job (torchrun_job) share it, and
    any other run, plain or of another job, raises UserError naming a live holder. A lock whose
    holders are all dead (SIGKILL, power cut) is taken over. Once it is held, the temporary files
    that killed runs left anywhere under `folder` are removed (clean_stale_tree). Raises UserError,
    with unwritable_hint, when the folder cannot be written: before any work."""
    path = os.path.join(folder, f".lock_{name}")
    me = {
        "pid": os.getpid(),
        "process_start": process_start(os.getpid()),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:200],
        "rank": int(os.environ.get("RANK", 0)),
    }
    job = torchrun_job()
    try:
        os.makedirs(folder, exist_ok=True)
        with _folder_guard(folder):
            holders = _live_holders(path, name, job, me["rank"])
            _write_lock(path, job, holders + [me])
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or e}){unwritable_hint}") from e
    try:
        clean_stale_tree(folder)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError), _folder_guard(folder):  # suppressed: the folder was deleted
            lock = read_json(path)
            holders = lock.get("holders") if isinstance(lock, dict) else None
            if isinstance(holders, list) and me in holders:
                holders.remove(me)
                if holders:
                    _write_lock(path, job, holders)
                else:
                    os.remove(path)


@contextlib.contextmanager
def _folder_guard(folder):
    """An exclusive flock of `folder` while the block runs: the lock files in it are read and
    written by one run at a time, so of two runs that find a lock free only one takes it."""
    import fcntl

    guard = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        yield
    finally:
        os.close(guard)  # releases the flock


def _live_holders(path, name, job, rank):
    """The holders of the lock file at `path` that this run (of the torchrun job `job`, None for a
    plain one, as `rank`) may share it with: [] when there is none or all are dead (said on stderr),
    the live ones of the same job when none of them is `rank` (ranks started by hand without a
    rendezvous port name one job: a second set of them is refused by its ranks' numbers); else
    UserError naming a live holder (one of another host counts as live: it cannot be asked). Called
    with the folder guarded."""
    if not os.path.exists(path):
        return []
    lock = read_json(path)
    lock = lock if isinstance(lock, dict) else {}
    holders = lock.get("holders", [lock])  # [lock]: the lock files of runs before shared locks name one holder
    holders = (
        [h for h in holders if isinstance(h, dict) and {"pid", "host", "started"} <= set(h)]
        if isinstance(holders, list)
        else []
    )
    if not holders:
        print(f"taking over {path}: it names no holder (unreadable)", file=sys.stderr)
        return []
    live = [h for h in holders if h["host"] != socket.gethostname() or process_alive(h["pid"], h.get("process_start"))]
    same_job = job is not None and lock.get("job") == job
    same_rank = [h for h in live if same_job and h.get("rank") == rank]
    if live and same_job and not same_rank:
        return live
    first = (same_rank or live or holders)[0]
    rank_text = f", torchrun rank {first.get('rank')}" if lock.get("job") else ""
    who = f"pid {first['pid']} on {first['host']} since {first['started']}{rank_text}: {first.get('command', '?')}"
    if not live:
        print(f"taking over {path}: the run that held it is gone ({who})", file=sys.stderr)
        return []
    if first["host"] != socket.gethostname():
        raise UserError(
            f"{os.path.dirname(path)} is in use by a {name} run on another host ({who}); wait "
            f"for it to finish, or delete {path} if that run is gone"
        )
    raise UserError(f"{os.path.dirname(path)} is in use by another {name} run ({who}); wait for it to finish")


def _write_lock(path, job, holders):
    """Replace the lock file at `path` at once (a reader never sees half of it); folder guarded."""
    tmp = tmp_path(os.path.dirname(path))
    with open(tmp, "w") as f:
        json.dump({"job": job, "holders": holders}, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- provenance
# What every stage records beside its outputs: what they were made from (a path and a fingerprint of
# the content) and the settings that matter, compared on the next run.


def setting_text(key, value):
    """A training setting as the command line gives it: 'with --warm-iters 50', 'with --fixed-iters',
    'without --fixed-iters'."""
    option = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return f"with {option}" if value else f"without {option}"
    return f"with {option} {value}"


def differing_setting(record, settings):
    """The first key of `settings` ({option dest: value}) that a record (a dict whose 'settings' holds
    those a stage trained with) has another value of; None when there is none. A record of the code
    before the settings were recorded, without 'settings', is taken as it is."""
    recorded = record.get("settings")
    if isinstance(recorded, dict):
        return next((key for key, value in settings.items() if recorded.get(key) != value), None)
    return None


def check_settings(path, record, settings, otherwise):
    """Raise UserError when the output at `path`, whose record is `record`, was trained with another
    value of one of `settings` than this run's: '<path> was trained with --seed 0, not with --seed 7;
    resume with --seed 0, or <otherwise>'."""
    key = differing_setting(record, settings)
    if key:
        old = setting_text(key, record["settings"].get(key))
        raise UserError(
            f"{path} was trained {old}, not {setting_text(key, settings[key])}; resume {old}, or {otherwise}"
        )


FINGERPRINT_SAMPLES = 1 << 20  # array elements hashed at most: a retrained timestep of params.npz changes thousands


def fingerprint(*items):
    """16 hex digits identifying `items`: bytes, JSON-able values, and numpy arrays by their dtype,
    shape and at most FINGERPRINT_SAMPLES evenly strided elements (cheap for gigabytes)."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, np.ndarray):
            flat = item.reshape(-1)
            data = f"{item.dtype} {item.shape}".encode() + flat[:: max(1, flat.size // FINGERPRINT_SAMPLES)].tobytes()
        else:
            data = item if isinstance(item, bytes) else json.dumps(item, sort_keys=True).encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:16]


SEQUENCE_RECORD = 2  # the version of sequence_identity's record (one without 'version' is of version 1)
# The files of a sequence that sequence_identity reads whole: small, and shared by all timesteps.
SEQUENCE_FILES = ("train_meta.json", "test_meta.json", "init_pt_cld.npz")


def _file_bytes(path):
    """The bytes of a file, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _size_and_time(path):
    """(size in bytes, modification time in ns) of a file; (None, None) when there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None, None
    return stat.st_size, stat.st_mtime_ns


def timestep_files(seq_dir, metas, t):
    """The images of timestep t of `metas` (load_meta's dicts) and each one's mask (seg_path, where
    there may be none: test cameras)."""
    return [
        path
        for meta in metas
        if t < len(meta["fn"])
        for fn in meta["fn"][t]
        for path in (os.path.join(seq_dir, "ims", fn), seg_path(seq_dir, fn))
    ]


def sequence_identity(seq_dir, metas):
    """What a sequence folder is, for the record of what outputs were made from (version SEQUENCE_RECORD):
    {'version', 'path': absolute, 'files': {name: fingerprint of its bytes, None when missing} of
    SEQUENCE_FILES, 'timesteps': per timestep of `metas` (load_meta's dicts) [fingerprint of the
    sizes of its images and masks, the newest of their modification times in ns]}. The images are
    only looked at (stat), never read: an edited image or mask almost always changes its size, and
    one that keeps it is newer than the record (sequence_mismatch)."""
    timesteps = []
    for t in range(max(len(meta["fn"]) for meta in metas)):
        stats = [_size_and_time(path) for path in timestep_files(seq_dir, metas, t)]
        timesteps.append([fingerprint([size for size, _ in stats]), max((time or 0 for _, time in stats), default=0)])
    return {
        "version": SEQUENCE_RECORD,
        "path": os.path.abspath(seq_dir),
        "files": {
            name: None if data is None else fingerprint(data)
            for name in SEQUENCE_FILES
            for data in [_file_bytes(os.path.join(seq_dir, name))]
        },
        "timesteps": timesteps,
    }


def _first_sequence_content(seq_dir, metas):
    """The 'content' of a record of version 1 (written before SEQUENCE_RECORD 2): a fingerprint of
    SEQUENCE_FILES and the sizes of the images of timestep 0."""
    items = [_file_bytes(os.path.join(seq_dir, name)) for name in SEQUENCE_FILES]
    for meta in metas:
        items.append([_size_and_time(os.path.join(seq_dir, "ims", fn))[0] for fn in meta["fn"][0]])
    return fingerprint(*items)


def sequence_mismatch(recorded, seq_dir, metas, num_t=None):
    """Whether outputs recorded as made from the sequence `recorded` (sequence_identity's record) fit
    the folder seq_dir as it is now, for timesteps 0..num_t-1 (default: all): ('', None) when they do
    (the same SEQUENCE_FILES and image and mask sizes, and in the same folder no image or mask newer
    than the record: a moved or copied sequence passes), else (a phrase saying how they do not, the
    first timestep that changed; 0 for other metas or init_pt_cld.npz, which in another folder make
    another sequence). A record of version 1 is checked as it was made: SEQUENCE_FILES and the image
    sizes of timestep 0."""
    path = os.path.abspath(seq_dir)
    moved = recorded.get("path") != path
    other = f"were made from another sequence, {recorded.get('path')} (not {path})"
    if "version" not in recorded:
        if recorded.get("content") == _first_sequence_content(seq_dir, metas):
            return "", None
        return other if moved else f"were made from {path} before its metas, init_pt_cld.npz or images changed", 0
    if recorded["version"] != SEQUENCE_RECORD:
        return f"were recorded by another version of this code (record version {recorded['version']})", 0
    current = sequence_identity(seq_dir, metas)
    changed = [name for name, digest in current["files"].items() if recorded.get("files", {}).get(name) != digest]
    if changed:
        return other if moved else f"were made from {path} before its {', '.join(changed)} changed", 0
    for t, ((sizes, newest), (old_sizes, old_newest)) in enumerate(
        zip(current["timesteps"][:num_t], recorded.get("timesteps", []))
    ):
        if sizes != old_sizes or (newest > old_newest and not moved):
            edited = [p for p in timestep_files(seq_dir, metas, t) if (_size_and_time(p)[1] or 0) > old_newest]
            more = f" (and {len(edited) - 1} more file(s))" if len(edited) > 1 else ""
            what = f"{edited[0]}{more}" if edited else "an image or mask"
            where = f"{recorded['path']} (now {path})" if moved else path
            return f"were made from {where} before {what} of timestep {t} changed", t
    return "", None


def stage1_sequence(run):
    """The sequence record (sequence_identity's) in stage 1's timesteps/run.json `run`, None without
    one; a run.json of version 1 kept it as 'seq' and 'content'."""
    if not isinstance(run, dict):
        return None
    if isinstance(run.get("sequence"), dict):
        return run["sequence"]
    return {"path": run.get("seq"), "content": run["content"]} if "content" in run else None


def check_stage1_sequence(params_path, seq_dir):
    """Raise UserError when the stage-1 outputs at params_path were made from another sequence than
    seq_dir, or from it before it changed, as stage 1's timesteps/run.json records (a params.npz
    without one, written elsewhere, is taken as it is): the later stages read both. Only the
    timesteps params.npz holds count."""
    recorded = stage1_sequence(read_json(os.path.join(os.path.dirname(params_path), "timesteps", "run.json")))
    if recorded is None:
        return
    metas = [load_meta(seq_dir, "train"), load_meta(seq_dir, "test")]
    why, t = sequence_mismatch(recorded, seq_dir, metas, read_d3dgs_params(params_path)["means3D"].shape[0])
    if why:
        raise UserError(
            f"{params_path} and the stage-1 outputs beside it {why}: give -s the sequence stage 1 was "
            f"trained on, or train {stage_name('train_d3dgs.py')} on {seq_dir} again from timestep {t} "
            f"(-f {t}) or with another -e"
        )


# ---------------------------------------------------------------- data


def read_npz(path, fix):
    """All arrays of an .npz file (numpy). Raises UserError naming the file and `fix` (what to do)
    when it is missing, truncated, not an .npz, or holds NaN/Inf in a float array."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; {fix}")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path} cannot be read as .npz ({type(e).__name__}: {e}); {fix}") from None
    bad = [k for k, v in arrays.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: {', '.join(bad)} hold(s) NaN or Inf; {fix}")
    return arrays


META_KEYS = ("w", "h", "k", "w2c", "fn", "cam_id")


def load_meta(seq_dir, split):
    """Read and check `<seq_dir>/<split>_meta.json` (split: 'train' or 'test').

    Returns the dict with w, h (int) and per timestep lists over cameras: k [T][C][3][3],
    w2c [T][C][4][4], fn [T][C] str ('<cam>/<t:06d>.jpg'), plus cam_id [C] int (flattened when
    the file repeats it per timestep) and path (the file). Raises UserError naming the file and
    the problem: missing or unreadable file, invalid JSON, missing keys, cameras that differ
    between timesteps or between k/w2c/fn/cam_id, arrays of the wrong shape, non-finite values.
    """
    path = os.path.join(seq_dir, f"{split}_meta.json")

    def bad(problem):
        return UserError(
            f"{path}: {problem}; fix or re-export the file (PanopticSports format: "
            f"w, h and per timestep lists over cameras of k, w2c, fn, cam_id)"
        )

    if not os.path.isfile(path):
        raise UserError(
            f"{path} not found: a sequence folder needs train_meta.json and test_meta.json "
            f"(PanopticSports format, see README)"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e})")
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e})")
    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not an object with keys {', '.join(META_KEYS)}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise bad(f"lacks key(s) {', '.join(missing)}")
    for key in ("w", "h"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
            raise bad(f"'{key}' is {value!r}, not a positive whole number of pixels")
    fn = meta["fn"]
    if not isinstance(fn, list) or not fn:
        raise bad("'fn' must be a non-empty list over timesteps")
    num_t = len(fn)
    for key in ("k", "w2c"):
        if not isinstance(meta[key], list) or len(meta[key]) != num_t:
            raise bad(f"'{key}' must be a list over the {num_t} timesteps of 'fn'")
    cam_ids = meta["cam_id"]
    if isinstance(cam_ids, list) and cam_ids and isinstance(cam_ids[0], list):  # repeated per timestep
        if len(cam_ids) != num_t:
            raise bad(f"'cam_id' lists {len(cam_ids)} timesteps, 'fn' {num_t}")
        for t, ids in enumerate(cam_ids):
            if ids != cam_ids[0]:
                raise bad(
                    f"the cameras differ between timesteps (cam_id at timestep {t} is {ids}, at 0 "
                    f"{cam_ids[0]}); every timestep must show the same cameras in the same order"
                )
        cam_ids = cam_ids[0]
    if (
        not isinstance(cam_ids, list)
        or not cam_ids
        or not all(isinstance(c, int) and not isinstance(c, bool) for c in cam_ids)
    ):
        raise bad(f"'cam_id' must be a non-empty list of integer camera ids, is {str(meta['cam_id'])[:60]}")
    num_c = len(cam_ids)
    for t in range(num_t):
        for key in ("k", "w2c", "fn"):
            entry = meta[key][t]
            if not isinstance(entry, list) or len(entry) != num_c:
                found = f"{len(entry)} entries" if isinstance(entry, list) else f"a {type(entry).__name__}"
                raise bad(f"timestep {t} has {found} in '{key}' but cam_id lists {num_c} cameras")
        for c, name in enumerate(fn[t]):
            if not isinstance(name, str) or name.count("/") != 1:
                raise bad(f"fn[{t}][{c}] is {name!r}, not '<camera>/<image file>'")
            if name.split("/")[0] != str(cam_ids[c]):
                raise bad(
                    f"fn[{t}][{c}] is {name!r} but cam_id[{c}] is {cam_ids[c]}: the cameras differ "
                    f"between timesteps or between fn and cam_id"
                )
    arrays = {}
    for key, size in (("k", 3), ("w2c", 4)):
        try:
            arrays[key] = np.asarray(meta[key], dtype=np.float64)
        except (ValueError, TypeError):
            raise bad(f"'{key}' is not a [{num_t}][{num_c}][{size}][{size}] array of numbers")
        if arrays[key].shape != (num_t, num_c, size, size):
            raise bad(f"'{key}' has shape {list(arrays[key].shape)}, expected [{num_t}, {num_c}, {size}, {size}]")
        if not np.isfinite(arrays[key]).all():
            raise bad(f"'{key}' holds NaN or Inf")
    k, w2c = arrays["k"], arrays["w2c"]
    if (k[..., 0, 0] <= 0).any() or (k[..., 1, 1] <= 0).any() or np.abs(k[..., 2, :] - [0, 0, 1]).max() > 1e-6:
        raise bad(
            "'k' holds a matrix that is not an intrinsics matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0"
        )
    rot = w2c[..., :3, :3]
    if (
        np.abs(w2c[..., 3, :] - [0, 0, 0, 1]).max() > 1e-6
        or np.abs(rot @ np.swapaxes(rot, -1, -2) - np.eye(3)).max() > 1e-3
        or (np.linalg.det(rot) <= 0).any()
    ):
        raise bad("'w2c' holds a matrix that is not a rigid world-to-camera transform [[R, t], [0, 0, 0, 1]]")
    meta["w"], meta["h"], meta["cam_id"] = int(meta["w"]), int(meta["h"]), list(cam_ids)
    meta["path"] = path
    return meta


def read_image_file(path, what, size=None, mode=None):
    """uint8 [H, W, channels of `mode`] of an image file (mode 'RGB' or 'L'); with mode None only its
    header is read (nothing decoded) and None returned. size (w, h) is checked when given; UserError
    naming the file (as `what`: 'image', 'mask') when it is missing, unreadable or of another size."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UserError(f"{what} {path} not found")
    try:
        with Image.open(path) as f:
            if size is not None and f.size != tuple(size):
                raise UserError(f"{what} {path} is {f.size[0]}x{f.size[1]}, the meta file says {size[0]}x{size[1]}")
            return None if mode is None else np.asarray(f.convert(mode))
    except OSError as e:  # PIL's UnidentifiedImageError and truncated data included
        raise UserError(f"{what} {path} cannot be read ({e}); replace the file")


def load_image(path, size=None):
    """RGB image as float32 [3, H, W] in [0, 1]; size (w, h) is checked when given."""
    im = read_image_file(path, "image", size, "RGB").astype(np.float32) / 255.0
    return torch.from_numpy(im).permute(2, 0, 1).contiguous()


def load_mask(path, size=None):
    """Foreground mask as float32 [H, W] in {0, 1} (from a 1-bit or 8-bit PNG)."""
    m = read_image_file(path, "mask", size, "L").astype(np.float32)
    return torch.from_numpy((m > 127).astype(np.float32) if m.max() > 1 else m)


def seg_path(seq_dir, fn):
    """Path of the foreground mask that belongs to image `fn` ('<cam>/<t>.jpg')."""
    return os.path.join(seq_dir, "seg", os.path.splitext(fn)[0] + ".png")


def check_sequence(seq_dir, meta, t_first=0, t_last=None, masks=False, headers=False):
    """Check, before hours of work, that timesteps t_first..t_last exist in `meta` (load_meta's)
    and that every image of them (and with masks=True every foreground mask) is on disk; with
    headers=True also that each opens as an image of the meta's size (headers only: a file whose
    pixel data is cut short passes, and fails where it is loaded)."""
    num_t = len(meta["fn"])
    t_last = num_t - 1 if t_last is None else t_last
    if not 0 <= t_first <= t_last < num_t:
        raise UserError(f"timesteps {t_first}..{t_last} asked for, but {meta['path']} has timesteps 0..{num_t - 1}")
    size = (meta["w"], meta["h"]) if headers else None
    for t in range(t_first, t_last + 1):
        for fn in meta["fn"][t]:
            image = os.path.join(seq_dir, "ims", fn)
            if not os.path.isfile(image):
                raise UserError(f"image {image} listed in {meta['path']} not found")
            if masks and not os.path.isfile(seg_path(seq_dir, fn)):
                raise UserError(
                    f"mask {seg_path(seq_dir, fn)} of image {image} not found (foreground masks "
                    f"live in <seq>/seg/<cam>/<t>.png)"
                )
            if headers:
                read_image_file(image, "image", size)
                if masks:
                    read_image_file(seg_path(seq_dir, fn), "mask", size)


def setup_camera(w, h, k, w2c, near=0.01, far=100.0, bg=(0.0, 0.0, 0.0), device="cpu", dtype=torch.float32):
    """Rasterizer settings for one camera: k [3, 3] intrinsics, w2c [4, 4] OpenCV world-to-camera
    (a point projects to column fx x / z + cx - 0.5 in pixel-index coordinates, as the original's
    NDC-to-pixel mapping). dtype float64 gives exact matrices for tests in float64."""
    fx, fy, cx, cy = float(k[0][0]), float(k[1][1]), float(k[0][2]), float(k[1][2])
    w2c = torch.as_tensor(np.asarray(w2c, dtype=np.float64), device=device).to(dtype)
    campos = torch.inverse(w2c)[:3, 3]
    view = w2c.T.contiguous()
    opengl_proj = torch.tensor(
        [
            [2 * fx / w, 0.0, -(w - 2 * cx) / w, 0.0],
            [0.0, 2 * fy / h, -(h - 2 * cy) / h, 0.0],
            [0.0, 0.0, far / (far - near), -(far * near) / (far - near)],
            [0.0, 0.0, 1.0, 0.0],
        ],
        dtype=dtype,
        device=device,
    ).T
    return Camera(
        image_height=int(h),
        image_width=int(w),
        tanfovx=w / (2 * fx),
        tanfovy=h / (2 * fy),
        bg=torch.tensor(bg, dtype=dtype, device=device),
        scale_modifier=1.0,
        viewmatrix=view,
        projmatrix=view @ opengl_proj,
        sh_degree=0,
        campos=campos,
        prefiltered=False,
    )


def orbit_w2c(center, radius, height, angle, up=ORBIT_UP):
    """OpenCV world-to-camera [4, 4] of a camera at `angle` (radians) on a horizontal circle around
    `center`, `height` above it along `up`, looking at the centre."""
    center, up = np.asarray(center, dtype=np.float64), np.asarray(up, dtype=np.float64)
    side = np.cross(up, [1.0, 0.0, 0.0])
    if np.linalg.norm(side) < 1e-6:
        side = np.cross(up, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    other = np.cross(up, side)
    pos = center + radius * (math.cos(angle) * side + math.sin(angle) * other) + height * up
    fwd = center - pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)  # OpenCV: x right, y down (= -up), z forward
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([right, down, fwd])
    w2c[:3, 3] = -w2c[:3, :3] @ pos
    return w2c


def orbit_cameras(meta, means3D, is_fg, num_t, device="cpu"):
    """Rasterizer settings per timestep [num_t] of the novel view that both visualisers show: a
    camera circling the foreground's centre once over the video (all Gaussians' centre without a
    foreground), at the median horizontal distance and median height of the train cameras of
    timestep 0 (+y is down), with train camera 0's intrinsics. means3D [N, 3], is_fg [N] bool."""
    means3D, is_fg = np.asarray(means3D, dtype=np.float64), np.asarray(is_fg, dtype=bool)
    center = means3D[is_fg].mean(0) if is_fg.any() else means3D.mean(0)
    offsets = np.linalg.inv(np.asarray(meta["w2c"][0]))[:, :3, 3] - center  # camera centres from there [C, 3]
    up = np.array(ORBIT_UP)
    height = float(np.median(offsets @ up))
    radius = float(np.median(np.linalg.norm(offsets - np.outer(offsets @ up, up), axis=1)))
    return [
        setup_camera(
            meta["w"],
            meta["h"],
            meta["k"][0][0],
            orbit_w2c(center, radius, height, 2 * math.pi * t / num_t),
            device=device,
        )
        for t in range(num_t)
    ]


# ---------------------------------------------------------------- geometry


def is_foreground(seg_colors):
    """seg_colors [N, 3] (fg, 0, 1 - fg), numpy or torch -> bool [N]: the foreground Gaussians."""
    return seg_colors[:, 0] > FOREGROUND_THRESHOLD


def knn(points, k, rows=None):
    """points [N, 3] numpy -> (squared distances [M, k], indices [M, k]) of the k nearest other
    points of each of the points `rows` [M] (None: all N) (scipy's KD-tree; no open3d)."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64)
    queries = points if rows is None else points[np.asarray(rows)]
    k_eff = min(k + 1, len(points))
    dist, idx = cKDTree(points).query(queries, k=k_eff)
    dist, idx = np.atleast_2d(dist)[:, 1:], np.atleast_2d(idx)[:, 1:]
    if dist.shape[1] < k:  # fewer points than neighbours asked for: repeat the last one
        pad = k - dist.shape[1]
        if dist.shape[1]:
            dist = np.concatenate([dist, np.repeat(dist[:, -1:], pad, 1)], 1)
            idx = np.concatenate([idx, np.repeat(idx[:, -1:], pad, 1)], 1)
        else:  # a single point: no neighbour at all
            dist, idx = np.zeros((len(queries), k)), np.zeros((len(queries), k), int)
    return dist**2, idx


def build_rotation(q):
    """q [N, 4] (w, x, y, z), any norm -> rotation matrices [N, 3, 3]."""
    from diff_gaussian_rasterization._torch_impl import quat_to_rotmat

    return quat_to_rotmat(q)


def quat_mult(q1, q2):
    """Hamilton product of [N, 4] (w, x, y, z) quaternions."""
    w1, x1, y1, z1 = q1.unbind(-1)
    w2, x2, y2, z2 = q2.unbind(-1)
    return torch.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        -1,
    )


def quat_conj(q):
    return q * torch.tensor([1.0, -1.0, -1.0, -1.0], device=q.device, dtype=q.dtype)


# ---------------------------------------------------------------- losses


def l1_loss(x, y):
    return torch.abs(x - y).mean()


def weighted_l2_loss(x, y, w):
    """Mean over neighbour pairs of w * ||x - y||: x, y [N, K, D], w [N, K]."""
    return torch.sqrt(((x - y) ** 2).sum(-1) * w + 1e-20).mean()


def psnr(img, gt):
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = ((img - gt) ** 2).mean()
    return float(10 * torch.log10(1.0 / mse.clamp(min=1e-12)))


# ---------------------------------------------------------------- video


def write_video(path, frames, fps=15):
    """frames: iterable of uint8 [H, W, 3] numpy arrays -> mp4 (H.264) at `path`, atomically."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg  # noqa: F401 (imageio's FFMPEG plugin runs its ffmpeg binary)
    except ImportError:
        raise UserError(
            f"{path}: writing an mp4 needs the imageio-ffmpeg package, which is not installed: "
            f"pip install imageio-ffmpeg (requirements.txt pins its version)"
        )

    def write(tmp):
        with imageio.get_writer(
            tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error"
        ) as writer:
            for frame in frames:
                # H.264 in yuv420p needs even sizes: repeat the last row / column where odd
                frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
                writer.append_data(np.ascontiguousarray(frame))

    atomic_write(path, write)


def to_uint8(img):
    """float [3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


# ================================================================ Dynamic 3D Gaussians (stage 1)
# Used by train_d3dgs.py and visualize_d3dgs.py; load_d3dgs_params is how later stages read stage 1.

D3DGS_PER_TIMESTEP = ("means3D", "rgb_colors", "unnorm_rotations")  # [T, N, .] in params.npz
D3DGS_SHARED = ("seg_colors", "logit_opacities", "log_scales", "cam_m", "cam_c")  # one for all t
# What lies beyond every Gaussian (a sky, whatever the background Gaussians leave uncovered): an
# equirectangular map by viewing direction, [4, rows, 2 rows]: colour (channels 0-2) and "open"
# (channel 3: the share of the light through the Gaussians that the segmentation counts as
# background, render_d3dgs); row 0 straight up (-y), column 0 azimuth -pi (atan2(x, z)). Written
# by this project's stage 1; the original's params.npz has none, and renders over black as before.
D3DGS_ENV_MAP = "env_map"
_D3DGS_WIDTHS = {
    "means3D": 3,
    "rgb_colors": 3,
    "unnorm_rotations": 4,
    "seg_colors": 3,
    "logit_opacities": 1,
    "log_scales": 3,
    "cam_m": 3,
    "cam_c": 3,
}
_D3DGS_CACHE = {}  # the last params.npz read: {(path, mtime): (arrays, fingerprint, {t or 'shared': fingerprint})}


def l1_loss_rows(x, y):
    """Mean over rows of the L1 distance between [N, D] rows (the original's l1_loss_v2)."""
    return torch.abs(x - y).sum(-1).mean()


def color_correct(im, cam_m, cam_c):
    """Per-camera colour correction of a render: exp(cam_m) * im + cam_c; im [3, H, W], cam_m/c [3]."""
    return torch.exp(cam_m)[:, None, None] * im + cam_c[:, None, None]


def cameras_at(meta, t, near=0.01, far=100.0, device="cpu"):
    """Rasterizer settings of every camera of `meta` (load_meta's dict) at timestep t."""
    return [
        setup_camera(meta["w"], meta["h"], meta["k"][t][c], meta["w2c"][t][c], near, far, device=device)
        for c in range(len(meta["cam_id"]))
    ]


def scale_meta(meta, factor):
    """load_meta's dict for images `factor` times smaller (w, h rounded down, intrinsics scaled to
    the new size, scale_intrinsics), and the images to match: resize_images(ims [.., H, W], meta)."""
    check_downscale(meta, factor)
    if factor == 1:
        return meta
    size = (meta["w"] // factor, meta["h"] // factor)
    return {**meta, "w": size[0], "h": size[1], "k": scale_intrinsics(meta["k"], (meta["w"], meta["h"]), size).tolist()}


def check_downscale(meta, factor):
    """Raise UserError unless --downscale `factor` is a whole number >= 1 that leaves the images of
    `meta` (load_meta's) at least MIN_DOWNSCALED_SIDE pixels a side."""
    most = max(1, min(meta["w"], meta["h"]) // MIN_DOWNSCALED_SIDE)
    if not 1 <= factor <= most:
        raise UserError(
            f"--downscale {factor}: the {meta['w']}x{meta['h']} images of {meta['path']} take 1 to "
            f"{most} (at least {MIN_DOWNSCALED_SIDE} pixels a side)"
        )


def scale_intrinsics(k, size, new_size):
    """Intrinsics [..., 3, 3] for images of size (w, h) resized to new_size by area averaging.
    float64 numpy. k counts from the image's corner (the top-left pixel's centre is (0.5, 0.5);
    setup_camera), and pixel edges scale with the image: fx and cx scale alike, as fy and cy."""
    k = np.array(k, dtype=np.float64)
    k[..., 0, :] *= new_size[0] / size[0]
    k[..., 1, :] *= new_size[1] / size[1]
    return k


def resize_images(ims, meta):
    """ims [B, C, H, W] float -> [B, C, meta h, meta w] by area averaging (no-op at that size)."""
    if ims.shape[-2:] == (meta["h"], meta["w"]):
        return ims
    return torch.nn.functional.interpolate(ims, size=(meta["h"], meta["w"]), mode="area")


def params2rendervar(params):
    """Stage-1 params (dict of tensors named as in params.npz, one timestep) -> rasterizer inputs:
    means3D [N, 3] world, rotations [N, 4] unit wxyz, opacities [N, 1] in (0, 1), scales [N, 3]
    world units, colors_precomp [N, 3], seg_colors [N, 3], and means2D [N, 3] zeros whose .grad
    becomes the screen-space (NDC) gradient that densification reads."""
    return {
        "means3D": params["means3D"],
        "rotations": torch.nn.functional.normalize(params["unnorm_rotations"]),
        "opacities": torch.sigmoid(params["logit_opacities"]),
        "scales": torch.exp(params["log_scales"]),
        "colors_precomp": params["rgb_colors"],
        "seg_colors": params["seg_colors"],
        "means2D": torch.zeros_like(params["means3D"], requires_grad=True),
    }


def render_d3dgs(cam, rendervar, background=None):
    """Colour and segmentation of Gaussians in ONE rasterizer pass: the segmentation colours ride
    along as 3 feature channels of the feature rasterizer (the original rendered the scene twice).

    rendervar: params2rendervar's keys (means2D optional); background: None or [4, H, W]
    (view_background's): the colour behind every Gaussian, shown where they let light through,
    and the share of that light seg counts as background (1 where nothing is expected in front, a
    sky; 0 where Gaussians must cover the background, so seg asks for them as the original did).
    Returns im [3, H, W] (over the background, else over cam.bg), seg [3, H, W] (over black, or
    over (0, 0, open)), radii [N] int32 (0 = not on screen), depth [1, H, W].
    """
    import diff_gaussian_rasterization_feat as dgrf

    inputs = {k: v for k, v in rendervar.items() if k != "seg_colors"}
    if "means2D" not in inputs:
        inputs["means2D"] = torch.zeros_like(rendervar["means3D"])
    im, radii, depth, seg = dgrf.GaussianRasterizer(cam)(legs_features=rendervar["seg_colors"], **inputs)
    if background is not None:
        through = 1 - seg.sum(0, keepdim=True)  # segmentation colours sum to 1: seg's sum is the opacity
        im = im + through * background[:3]
        seg = torch.cat([seg[:2], seg[2:] + through * background[3:]])
    return im, seg, radii, depth


def ray_directions(cam):
    """Unit viewing directions [H, W, 3] (world) through the centres of a camera's pixels (cam:
    setup_camera's), found by inverting its projection: pixel index u has NDC (2 u + 1) / W - 1."""
    h, w = cam.image_height, cam.image_width
    device = cam.projmatrix.device
    ndc_y, ndc_x = torch.meshgrid(
        (2 * torch.arange(h, device=device, dtype=torch.float64) + 1) / h - 1,
        (2 * torch.arange(w, device=device, dtype=torch.float64) + 1) / w - 1,
        indexing="ij",
    )
    clip = torch.stack([ndc_x, ndc_y, torch.ones_like(ndc_x), torch.ones_like(ndc_x)], -1)
    world = clip @ torch.linalg.inv(cam.projmatrix.double())
    return torch.nn.functional.normalize(world[..., :3] / world[..., 3:] - cam.campos.double(), dim=-1).float()


def env_map_coordinates(dirs):
    """grid_sample coordinates [..., 2] in [-1, 1] of unit directions [..., 3] (world) on an
    equirectangular map (D3DGS_ENV_MAP): x the azimuth atan2(x, z) / pi, y the elevation above the
    floor (up = -y) from -1 straight up to 1 straight down."""
    azimuth = torch.atan2(dirs[..., 0], dirs[..., 2])
    elevation = torch.asin((-dirs[..., 1]).clamp(-1.0, 1.0))
    return torch.stack([azimuth / math.pi, -elevation / (math.pi / 2)], -1)


def sample_env_map(env_map, dirs):
    """Values [C, H, W] of an environment map [C, rows, cols] in the directions dirs [H, W, 3]
    (ray_directions'), bilinear, wrapping around in azimuth (differentiable in env_map)."""
    cols = env_map.shape[2]
    wrapped = torch.cat([env_map[:, :, -1:], env_map, env_map[:, :, :1]], 2)
    grid = env_map_coordinates(dirs) * torch.tensor([cols / (cols + 2), 1.0], device=dirs.device)
    return torch.nn.functional.grid_sample(
        wrapped[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def read_d3dgs_params(path):
    """All arrays of a stage-1 params.npz (numpy, checked): means3D [T, N, 3], rgb_colors [T, N, 3],
    unnorm_rotations [T, N, 4], seg_colors [N, 3], logit_opacities [N, 1], log_scales [N, 3],
    cam_m [C, 3], cam_c [C, 3], all finite. The last file read stays cached (keyed by its
    modification time), so asking for one timestep after another reads the file once."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: " + run_first("train_d3dgs.py", "python train_d3dgs.py -s <seq> -e <exp>"))
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    if key not in _D3DGS_CACHE:
        arrays = read_npz(path, f"run {stage_name('train_d3dgs.py')} again: python train_d3dgs.py -s <seq> -e <exp>")
        missing = [k for k in D3DGS_PER_TIMESTEP + D3DGS_SHARED if k not in arrays]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: not a Dynamic 3D Gaussians params.npz")
        if arrays["means3D"].ndim != 3 or arrays["means3D"].shape[0] == 0:
            raise UserError(f"{path}: 'means3D' has shape {list(arrays['means3D'].shape)}, expected [T, N, 3]")
        num_t, n = arrays["means3D"].shape[:2]
        for k, width in _D3DGS_WIDTHS.items():
            want = (
                (num_t, n, width)
                if k in D3DGS_PER_TIMESTEP
                else (arrays[k].shape[0], width)
                if k in ("cam_m", "cam_c")
                else (n, width)
            )
            if arrays[k].shape != want:
                raise UserError(f"{path}: '{k}' has shape {list(arrays[k].shape)}, expected {list(want)}")
        env_map = arrays.get(D3DGS_ENV_MAP)
        if env_map is not None and (env_map.ndim != 3 or env_map.shape[::2] != (4, 2 * env_map.shape[1])):
            raise UserError(
                f"{path}: '{D3DGS_ENV_MAP}' has shape {list(env_map.shape)}, expected [4, rows, 2 rows]; "
                f"train stage 1 again: python train_d3dgs.py -s <seq> -e <exp>"
            )
        _D3DGS_CACHE.clear()
        _D3DGS_CACHE[key] = arrays, fingerprint(*(arrays[k] for k in sorted(arrays))), {}
    return _D3DGS_CACHE[key][0]


def d3dgs_identity(path, t=None):
    """What a stage-1 params.npz is, for the provenance of what is made from it: {'path': absolute,
    'fingerprint': of its arrays' content (not of the file: reassembling the same timesteps keeps it)}.
    With t, the fingerprint covers what timestep t renders alone (the shared arrays and row t of the
    per-timestep ones), which stays when stage 1 appends timesteps."""
    arrays = read_d3dgs_params(path)
    key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
    whole, per_timestep = _D3DGS_CACHE[key][1:]
    if t is None:
        return {"path": key[0], "fingerprint": whole}
    if "shared" not in per_timestep:  # each computed once per version of the file (a sequence asks for every t)
        per_timestep["shared"] = fingerprint(*(arrays[k] for k in sorted(arrays) if k not in D3DGS_PER_TIMESTEP))
    if t not in per_timestep:
        per_timestep[t] = fingerprint(t, per_timestep["shared"], *(arrays[k][t] for k in D3DGS_PER_TIMESTEP))
    return {"path": key[0], "fingerprint": per_timestep[t]}


def load_env_map(path, device="cpu"):
    """The environment map [4, rows, 2 rows] (float32, on device) of a stage-1 params.npz, or None
    where it has none (the original's): render_d3dgs(cam, gaussians, view_background(cam, env_map))."""
    env_map = read_d3dgs_params(path).get(D3DGS_ENV_MAP)
    return None if env_map is None else torch.as_tensor(env_map, dtype=torch.float32, device=device)


def view_background(cam, env_map):
    """What a camera sees behind the Gaussians: env_map [4, rows, 2 rows] in its pixels' directions,
    [4, H, W] (render_d3dgs's background); None without an environment map."""
    return None if env_map is None else sample_env_map(env_map, ray_directions(cam))


def render_view(cam, gaussians, env_map):
    """render_d3dgs's image [3, H, W] of gaussians (load_d3dgs_params') over env_map (load_env_map's,
    or None: over black), clamped to [0, 1]."""
    return render_d3dgs(cam, gaussians, view_background(cam, env_map))[0].clamp(0, 1)


def load_d3dgs_params(path, t, device="cpu"):
    """Gaussians of timestep t of a stage-1 params.npz as rasterizer inputs on `device` (float32):
    means3D [N, 3] world, rotations [N, 4] (unit wxyz), opacities [N, 1] (sigmoid applied),
    scales [N, 3] (exp applied), colors_precomp [N, 3] (rgb_colors), seg_colors [N, 3]
    ((1, 0, 0) foreground, (0, 0, 1) background). render_d3dgs(cam, ...) renders it as it is."""
    arrays = read_d3dgs_params(path)
    num_t = arrays["means3D"].shape[0]
    if not -num_t <= t < num_t:
        raise UserError(f"{path} holds timesteps 0..{num_t - 1}; timestep {t} asked for")
    params = {
        k: torch.as_tensor(arrays[k][t] if k in D3DGS_PER_TIMESTEP else arrays[k], dtype=torch.float32, device=device)
        for k in _D3DGS_WIDTHS
    }
    rendervar = params2rendervar(params)
    del rendervar["means2D"]
    return rendervar
