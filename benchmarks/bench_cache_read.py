"""Reading the stage-3 cache as stage 5 does: every camera's tile levels of one timestep, one by one.

    python benchmarks/bench_cache_read.py [--timesteps 40] [--cams 27] [--width 640 --height 360] [--reuse 0.64]

Writes a cache of random embeddings (768-d, the real tile layout) for --timesteps timesteps as a
reusing extract_features.py run writes it: each tile of a later timestep keeps its embedding with
probability --reuse (stored once, in the folder of the timestep that encoded it), else it is
encoded again. Then, in this one process, reads the last timestep and then the first (which holds
all its rows) camera by camera, level by level (feature_cache.load_level), and prints the seconds
of each and the number of folders the last one reads from. The cache goes under results/ and is
removed at the end.
"""

import argparse
import atexit
import os
import shutil
import tempfile
import time

import numpy as np

import helpers
from feature_extraction import cache as feature_cache
from feature_extraction import tiles


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, default=40, help="timesteps written (default: %(default)s)")
    p.add_argument("--cams", type=int, default=27, help="cameras (default: %(default)s, basketball's)")
    p.add_argument("--width", type=int, default=640, help="image width (default: %(default)s)")
    p.add_argument("--height", type=int, default=360, help="image height (default: %(default)s)")
    p.add_argument(
        "--reuse", type=float, default=0.64, help="share of tiles reused per timestep (default: %(default)s)"
    )
    args = p.parse_args()
    for option in ("timesteps", "cams", "width", "height"):
        helpers.check_option(args, option, at_least=1)
    helpers.check_option(args, "reuse", at_least=0, below=1)
    levels = tiles.tile_levels(args.height, args.width)
    num_tiles = sum(args.cams * lv["rows"] * lv["cols"] for lv in levels)
    config = {
        "cam_id": list(range(args.cams)),
        "levels": levels,
        "width": args.width,
        "height": args.height,
        "dim": 768,
        "dtype": feature_cache.DTYPES[0],
    }
    os.makedirs("results", exist_ok=True)
    cache = tempfile.mkdtemp(prefix="bench_cache_read_", dir="results")
    atexit.register(shutil.rmtree, cache, True)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((num_tiles, 768)).astype(np.float16)
    sources, runs = None, {}
    for t in range(args.timesteps):
        reused = rng.random(num_tiles) < args.reuse if t else np.zeros(num_tiles, dtype=bool)
        sources = np.where(reused, sources, t) if t else np.full(num_tiles, t)
        runs[t] = feature_cache.write_timestep(cache, t, config, embeddings, sources, runs)
    for t in (args.timesteps - 1, 0):
        start = time.perf_counter()
        for cam in range(args.cams):
            for i in range(len(levels)):
                feature_cache.load_level(cache, t, i, cam)
        print(f"timestep {t}: every camera's levels read in {time.perf_counter() - start:.2f} s")
    print(f"timestep {args.timesteps - 1} reads from {len(np.unique(sources))} folders ({num_tiles} tiles)")


if __name__ == "__main__":
    helpers.run_main(main)
