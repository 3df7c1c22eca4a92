"""The embedded demo set: small procedurally drawn images, generated in seconds, no downloads.

Each image is one coloured shape on a textured background:

    shape       circle, square, triangle, cross, diamond, ring      -> the label (`cls`)
    colour      red, green, blue, yellow, magenta, cyan              (independent of the shape)
    size        small, medium, large: 55-95 % of the image side     (18-30 px at 32 px)
    position    a 3x3 grid: top left ... center ... bottom right     (jittered inside its cell)
    background  plain, striped, checkered, dotted, noisy             (random colours and phase)

and a caption says all of it: "a small red triangle at the top left on a striped background".

Why it looks like this: the label must be something self-supervised pretraining can discover
in a few CPU minutes, and something a random encoder cannot read off. The label is only the
shape; colour, size, position and background are random and independent of it, so the class is
not readable from mean colour or any single pixel, and the textures add nuisance that a randomly
initialised encoder passes straight through. The shape is large because of how MAE learns: with
8-px patches on 32 px and 75% masking, the encoder sees 4 of 16 patches and has to paint the
other 12. A shape spanning most of the image shows part of its outline in almost every visible
patch, and which masked patches are shape and which are background follows from the shape
(a ring's hole, a triangle's empty top corners, a cross's arms): the reconstruction loss pays
for knowing the shape from the first minutes. Smaller shapes (DEMO_VERSION 2 drew them at 35-82 %
of the side) often lie entirely in masked patches, leaving nothing to infer, and 500 MAE steps
learnt little about them; the measurements are in benchmarks/README.md.

Images are lossless PNG. Generation is a pure function of (count, image size, seed).
"""

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.data.write import index_name, write_shards
from pretrain.errors import DataError

# Bump when the drawing changes, so cached demo data from an older version is not reused.
DEMO_VERSION = 3
SHARD_SIZE = 500  # samples per shard: several shards even for small sets, for ranks x workers

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS = {
    "red": (220, 45, 40),
    "green": (40, 185, 70),
    "blue": (45, 95, 235),
    "yellow": (240, 215, 40),
    "magenta": (215, 55, 205),
    "cyan": (40, 205, 215),
}
SIZES = {"small": (0.55, 0.66), "medium": (0.68, 0.80), "large": (0.82, 0.95)}  # of image side
ROWS = ("top", "", "bottom")
COLUMNS = ("left", "", "right")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "noisy")


def position_name(row: int, column: int) -> str:
    name = " ".join(word for word in (ROWS[row], COLUMNS[column]) if word)
    return name or "center"


def caption(size: str, colour: str, shape: str, position: str, background: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {size} {colour} {shape} {where} on a {background} background"


# ----------------------------------------------------------------------------------------------
# Drawing. Every function works on a pixel grid `ys, xs`: [S, S] float coordinates of pixel
# centres. Shapes are signed distances (negative inside, in pixels), which gives anti-aliased
# edges for free: coverage = clip(0.5 - distance, 0, 1).


def shape_distance(shape: str, dy: np.ndarray, dx: np.ndarray, half: float) -> np.ndarray:
    """Signed distance [S, S] to `shape` of half-size `half`, centred at dy = dx = 0."""
    radius = np.sqrt(dx * dx + dy * dy)
    if shape == "circle":
        return radius - half
    if shape == "square":  # slightly smaller than its box, so its area is near the circle's
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * half
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - half) / np.sqrt(2.0)
    if shape == "ring":
        return np.abs(radius - 0.72 * half) - 0.28 * half
    if shape == "cross":
        arm = 0.32 * half
        horizontal = np.maximum(np.abs(dx) - half, np.abs(dy) - arm)
        vertical = np.maximum(np.abs(dy) - half, np.abs(dx) - arm)
        return np.minimum(horizontal, vertical)
    if shape == "triangle":  # pointing up; image y grows downwards
        top, left, right = (0.0, -half), (-half, half), (half, half)
        distance = dy - half  # the bottom edge
        for (ax, ay), (bx, by) in ((top, left), (right, top)):
            # outward normal of the edge a -> b (left and right flanks)
            nx, ny = by - ay, -(bx - ax)
            norm = np.hypot(nx, ny)
            if nx * (0 - ax) + ny * (0 - ay) > 0:  # make it point away from the centre
                nx, ny = -nx, -ny
            distance = np.maximum(distance, ((dx - ax) * nx + (dy - ay) * ny) / norm)
        return distance
    raise ValueError(f"unknown shape {shape}")


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A background colour: darker and greyer than the shape colours, so shapes stay visible."""
    grey = rng.uniform(35, 150)
    return np.clip(grey + rng.normal(0, 30, 3), 0, 255)


def background(kind: str, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A textured background [S, S, 3] float in 0..255."""
    size = ys.shape[0]
    first = muted_colour(rng)
    if kind == "plain":
        return np.broadcast_to(first, (size, size, 3)).copy()
    if kind == "noisy":
        return np.clip(first + rng.normal(0, 14, (size, size, 3)), 0, 255)
    # The texture's second colour is near the first: present everywhere, weaker than the shape.
    second = np.clip(first + rng.normal(0, 22, 3), 0, 255)
    if kind == "striped":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        period = rng.uniform(3, 8) * size / 32
        along = xs * np.cos(angle) + ys * np.sin(angle) + rng.uniform(0, period)
        mask = (along % period) < period / 2
    elif kind == "checkered":
        period = rng.uniform(3, 8) * size / 32
        cells = np.floor((xs + rng.uniform(0, period)) / period) + np.floor(
            (ys + rng.uniform(0, period)) / period
        )
        mask = cells % 2 == 0
    elif kind == "dotted":
        period = rng.uniform(4, 7) * size / 32
        radius = rng.uniform(0.25, 0.4) * period
        offset_x, offset_y = rng.uniform(0, period, 2)
        near_x = (xs + offset_x) % period - period / 2
        near_y = (ys + offset_y) % period - period / 2
        mask = near_x**2 + near_y**2 < radius**2
    else:
        raise ValueError(f"unknown background {kind}")
    return np.where(mask[..., None], second, first)


def draw(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, dict]:
    """One random demo image [S, S, 3] uint8 on the pixel grid `ys, xs`, and its attributes."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    row, column = rng.integers(3, size=2)
    texture = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]

    image_size = ys.shape[0]
    low, high = SIZES[size]
    side = rng.uniform(low, high) * image_size
    # The centre may go anywhere the shape still fits; the 3x3 cell picks a third of that range.
    span = image_size - side
    centre_y = side / 2 + span * (row + rng.uniform(0, 1)) / 3
    centre_x = side / 2 + span * (column + rng.uniform(0, 1)) / 3

    canvas = background(texture, ys, xs, rng)
    distance = shape_distance(shape, ys - centre_y, xs - centre_x, side / 2)
    coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    fill = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255)
    pixels = canvas * (1 - coverage) + fill * coverage
    attributes = {
        "shape": shape,
        "colour": colour,
        "size": size,
        "position": position_name(row, column),
        "background": texture,
    }
    return np.rint(pixels).astype(np.uint8), attributes


def demo_samples(count: int, image_size: int, seed: int, split: str) -> Iterator[dict]:
    """Shard samples (`__key__`, `png`, `cls`, `txt`) for one split, drawn in a fixed order."""
    split_number = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([seed, split_number, DEMO_VERSION])
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5  # pixel centres
    for number in range(count):
        pixels, attributes = draw(rng, ys, xs)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
        yield {
            "__key__": f"{split}-{number:07d}",
            "png": buffer.getvalue(),
            "cls": SHAPES.index(attributes["shape"]),
            "txt": caption(**attributes),
        }


def write_demo(
    out_dir: str | Path,
    num_train: int = 10000,
    num_val: int = 2000,
    image_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict]:
    """Write `train-*.tar` and `val-*.tar` (+ indexes) into `out_dir`; returns {split: index}."""
    if num_train < 1 or num_val < 0:
        raise DataError(f"demo needs num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    if image_size < 16:
        raise DataError(f"demo image size must be at least 16 pixels, got {image_size}")
    written = {}
    for split, count in (("train", num_train), ("val", num_val)):
        if count == 0:
            continue
        written[split] = write_shards(
            demo_samples(count, image_size, seed, split),
            out_dir,
            prefix=split,
            max_count=SHARD_SIZE,
            class_names=list(SHAPES),
            total=count,
            overwrite=overwrite,
            progress=progress,
        )
    return written


PARAMETERS_FILE = "demo-parameters.json"


def ensure_demo_data(
    cache_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, str]:
    """Write the demo set once into a folder under `cache_dir` and reuse it afterwards.

    The folder name carries the parameters (`demo-v3-32px-train20000-val2000-seed0`) and holds
    them in `demo-parameters.json`, written last. It is built in a temporary folder and renamed
    into place, so concurrent callers (several ranks) never see a half-written set; a loser of
    the race discards its copy. Returns shard specs: {"train": <index path>, "val": <index
    path or "">, "dir": <folder>}, ready for `expand_shards`.
    """
    parameters = {
        "version": DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
    }
    cache_dir = Path(cache_dir)
    name = f"demo-v{DEMO_VERSION}-{image_size}px-train{num_train}-val{num_val}-seed{seed}"
    target = cache_dir / name
    if not _is_complete(target, parameters):
        cache_dir.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
        try:
            write_demo(building, num_train, num_val, image_size, seed, progress=progress)
            (building / PARAMETERS_FILE).write_text(json.dumps(parameters, indent=1) + "\n")
            building.chmod(0o755)  # mkdtemp makes it private; the data is not
            if target.exists() and not _is_complete(target, parameters):
                shutil.rmtree(target)  # left over from an interrupted older layout
            try:
                os.rename(building, target)
            except OSError:  # another process finished first; theirs is identical
                if not _is_complete(target, parameters):
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return {
        "train": str(target / index_name("train")),
        "val": str(target / index_name("val")) if num_val > 0 else "",
        "dir": str(target),
    }


def demo_shards(
    accelerator, demo_dir: str | Path, num_train: int, num_val: int, image_size: int
) -> dict[str, str]:
    """ensure_demo_data on every process of `accelerator`: the main process writes the set (with
    a progress bar) while the others wait, then they read its indexes."""
    with accelerator.main_process_first():
        return ensure_demo_data(
            demo_dir, num_train, num_val, image_size, seed=0, progress=accelerator.is_main_process
        )


def use_demo_data_if_unset(data, accelerator) -> None:
    """A pretraining DataConfig `data` with no train_shards gets the embedded demo set's: written
    once (main process), then data.train_shards (and an unset data.val_shards) point at it."""
    if data.train_shards:
        return
    demo = demo_shards(
        accelerator, data.demo_dir, data.demo_train_samples, data.demo_val_samples, data.image_size
    )
    data.train_shards = demo["train"]
    data.val_shards = data.val_shards or demo["val"]


def _is_complete(folder: Path, parameters: dict) -> bool:
    try:
        stored = json.loads((folder / PARAMETERS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored == parameters
