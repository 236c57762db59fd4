"""A small synthetic detection dataset of coloured shapes, made on this machine without downloads.

Six classes, defined by shape alone: circle, square, triangle, star, ring and cross. Each picture
has a cluttered background (colour gradient, low-frequency blotches, distractor strokes, pixel
noise) and two to six objects of varied size (small objects included), aspect ratio, rotation,
colour and texture (solid, gradient, stripes, checker, speckle); later objects may partly hide
earlier ones. Boxes enclose the visible part of each object.

Layout under the dataset root::

    root/
      MANIFEST.json              generator version, seed and counts; written last
      annotations/train.json     COCO instances format (bbox xywh, area, iscrowd 0, ids 1..6)
      annotations/val.json
      train/000000.jpg ...
      val/000000.jpg ...

The root defaults to ``$DEFORMABLE_DETR_DATASETS/quickstart`` and, without that variable, to
``datasets/quickstart`` under the current working directory. Importing ``deformable_detr``
registers ``quickstart_train`` and ``quickstart_val``; nothing is generated until a dataset is
first read (``DatasetCatalog.get``) or :func:`ensure_quickstart_dataset` is called. Generation
is deterministic (every picture has its own seed), happens in a temporary folder that is renamed
into place when complete, and is redone when the manifest is missing, incomplete or written by an
older generator.

A second dataset, :data:`SHAPES_FINETUNE` (``shapes_finetune_train`` / ``shapes_finetune_val``
under ``$DEFORMABLE_DETR_DATASETS/shapes_finetune``), has another class set (circle, triangle and
star of the quickstart plus hexagon and diamond) on other backgrounds (tiles instead of
gradients): the data of the fine-tuning example, a model trained on the quickstart being the
pretrained one.
"""

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections import namedtuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "QUICKSTART",
    "QUICKSTART_CLASSES",
    "SHAPES_FINETUNE",
    "ShapesDataset",
    "register_shapes_datasets",
    "QUICKSTART_COLORS",
    "default_quickstart_root",
    "generate_quickstart_dataset",
    "ensure_quickstart_dataset",
    "register_quickstart_datasets",
    "render_quickstart_image",
]

logger = logging.getLogger(__name__)

# Bump whenever the quickstart pictures or annotations change, so that cached copies are
# regenerated.
GENERATOR_VERSION = 4

QUICKSTART_CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]
QUICKSTART_COLORS = [
    (220, 20, 60),
    (0, 130, 200),
    (60, 180, 75),
    (255, 165, 0),
    (145, 30, 180),
    (0, 200, 200),
]

ShapesDataset = namedtuple("ShapesDataset", "name classes colors background version")
ShapesDataset.__doc__ = """A synthetic shapes dataset: its name (the prefix of the registered
names and the cache folder), class names, drawing colours, background style ("clutter" or
"tiles") and generator version (bumped whenever its pictures change; None: GENERATOR_VERSION)."""

# The quickstart's version is GENERATOR_VERSION itself (None), read when a dataset is checked.
QUICKSTART = ShapesDataset("quickstart", QUICKSTART_CLASSES, QUICKSTART_COLORS, "clutter", None)
SHAPES_FINETUNE = ShapesDataset(
    "shapes_finetune",
    ["circle", "triangle", "star", "hexagon", "diamond"],
    [(220, 20, 60), (60, 180, 75), (255, 165, 0), (240, 50, 230), (128, 128, 0)],
    "tiles",
    1,
)

DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 80
DEFAULT_SEED = 0

_SPLITS = ("train", "val")
_MANIFEST = "MANIFEST.json"
# Small pictures: a CPU trains on many more of them in the same time.
_IMAGE_SIDES = (192, 224, 256)
_JPEG_QUALITY = 92
# Object size (longer side before rotation, pixels): a fifth small, the rest medium/large.
_SMALL_FRACTION = 0.2
_SMALL_SIZE = (14.0, 32.0)
_LARGE_SIZE = (32.0, 100.0)
# Occlusion: every object keeps this much of its area, and no two overlap more than _MAX_OVERLAP.
_MIN_VISIBLE_FRACTION = 0.7
_MAX_OVERLAP = 0.35
# Objects per picture and their probabilities (about four on average: more objects per picture
# is more to learn from per training step). An object that finds no place is left out.
_NUM_OBJECTS = (2, 3, 4, 5, 6)
_NUM_OBJECTS_P = (0.15, 0.25, 0.25, 0.2, 0.15)
# Smallest summed |RGB| difference (0..3) between an object's colour and what lies under it.
_MIN_CONTRAST = 0.9
# cv2 polygon vertices carry this many fractional bits, for sub-pixel edges.
_SHIFT = 4


def _version(dataset):
    return GENERATOR_VERSION if dataset.version is None else dataset.version


def default_quickstart_root(dataset=QUICKSTART):
    """
    Args:
        dataset (ShapesDataset): which dataset.

    Returns:
        str: where the dataset is cached by default: ``$DEFORMABLE_DETR_DATASETS/<name>``, or
        ``datasets/<name>`` under the current working directory.
    """
    base = os.environ.get("DEFORMABLE_DETR_DATASETS", "datasets")
    return os.path.abspath(os.path.join(base, dataset.name))


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _random_color(rng, min_value=0.15):
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(60, 255), rng.uniform(min_value * 255, 255)]]],
        dtype=np.float32,
    )
    # OpenCV's float HSV uses hue in degrees [0, 360) and S, V in [0, 1].
    hsv[..., 0] *= 2.0
    hsv[..., 1:] /= 255.0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _background(rng, height, width):
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = _random_color(rng), _random_color(rng)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # Low-frequency blotches, so that backgrounds are not plain gradients.
    grid = rng.normal(0.0, 0.08, size=(rng.integers(3, 8), rng.integers(3, 8), 3))
    img += cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 1).astype(np.float32)

    # Distractor strokes: thin lines, polylines and arcs that are not objects.
    for _ in range(int(rng.integers(2, 8))):
        color = tuple(float(c) for c in _random_color(rng, 0.05))
        thickness = int(rng.integers(1, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            p0 = rng.uniform([0, 0], [width, height])
            p1 = rng.uniform([0, 0], [width, height])
            cv2.line(img, _fixed(p0), _fixed(p1), color, thickness, cv2.LINE_AA, _SHIFT)
        elif kind == 1:
            pts = np.cumsum(rng.normal(0, 25, size=(int(rng.integers(3, 7)), 2)), axis=0)
            pts += rng.uniform([0, 0], [width, height])
            cv2.polylines(img, [_fixed(pts)], False, color, thickness, cv2.LINE_AA, _SHIFT)
        else:
            center = _fixed(rng.uniform([0, 0], [width, height]))
            axes = _fixed(rng.uniform(10, 60, size=2))
            start = float(rng.uniform(0, 360))
            span = float(rng.uniform(40, 200))
            angle = float(rng.uniform(0, 180))
            args = (center, axes, angle, start, start + span, color, thickness, cv2.LINE_AA)
            cv2.ellipse(img, *args, _SHIFT)
    return img


def _tiles_background(rng, height, width):
    """Rectangular tiles of random colours with grout lines, plus a faint grain."""
    tile = rng.uniform(18, 60)
    rows, cols = int(math.ceil(height / tile)) + 1, int(math.ceil(width / tile)) + 1
    palette = np.stack([_random_color(rng) for _ in range(int(rng.integers(2, 5)))])
    grid = palette[rng.integers(0, len(palette), size=(rows, cols))].astype(np.float32)
    offset = rng.uniform(0, tile, size=2)
    ys = ((np.arange(height) + offset[0]) // tile).astype(int)
    xs = ((np.arange(width) + offset[1]) // tile).astype(int)
    img = grid[ys][:, xs].copy()
    grout = _random_color(rng, 0.05).astype(np.float32)
    line = max(1, int(round(tile / 12)))
    img[((np.arange(height) + offset[0]) % tile) < line] = grout
    img[:, ((np.arange(width) + offset[1]) % tile) < line] = grout
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _fixed(points):
    """Convert float pixel coordinates to cv2's fixed-point integers (``_SHIFT`` fraction bits)."""
    arr = np.round(np.asarray(points, dtype=np.float64) * (1 << _SHIFT)).astype(np.int32)
    return tuple(int(v) for v in arr) if arr.ndim == 1 else arr


def _outline(category, rng):
    """
    Returns:
        list[ndarray]: closed polygons in a unit frame centred at 0 with extent [-1, 1]; the first is
        filled, the following ones are holes.
    """
    if category in ("circle", "ring"):
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        if category == "circle":
            return [outer]
        return [outer, outer * rng.uniform(0.45, 0.7)]
    if category == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if category == "hexagon":
        t = np.arange(6) * math.pi / 3
        return [np.stack([np.cos(t), np.sin(t)], axis=1)]
    if category == "diamond":
        return [np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.float64)]
    if category == "triangle":
        # Apex anywhere along the top edge: isosceles, right-angled and scalene triangles.
        apex = rng.uniform(-1, 1)
        return [np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if category == "star":
        inner = rng.uniform(0.38, 0.55)
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]
    if category == "cross":
        # A plus sign: the 12 corners of two overlapping bars of half-width ``a``.
        a = rng.uniform(0.25, 0.4)
        quarter = np.array([[a, -1], [a, -a], [1, -a]])
        corners = []
        rot90 = np.array([[0.0, -1.0], [1.0, 0.0]])
        for k in range(4):
            corners.append(quarter @ np.linalg.matrix_power(rot90, k).T)
        return [np.concatenate(corners, axis=0)]
    raise ValueError(f"unknown quickstart category {category!r}")


def _shape_alpha(rng, category, height, width, size):
    """Draw one shape with anti-aliased edges; returns its coverage in [0, 1] as (H, W) float32."""
    aspect = math.exp(rng.uniform(-math.log(1.7), math.log(1.7)))
    if category == "star":
        aspect = math.exp(rng.uniform(-math.log(1.25), math.log(1.25)))
    half_w = 0.5 * size * min(1.0, aspect)
    half_h = 0.5 * size * min(1.0, 1.0 / aspect)
    if category in ("circle", "ring"):
        angle = rng.uniform(0, math.pi)
    else:
        angle = rng.uniform(-math.radians(25), math.radians(25))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    polys = [(p * [half_w, half_h]) @ rot.T for p in _outline(category, rng)]
    lo = polys[0].min(axis=0)
    hi = polys[0].max(axis=0)
    # Keep the whole object inside the picture, with a one-pixel margin.
    cx = rng.uniform(1 - lo[0], width - 1 - hi[0])
    cy = rng.uniform(1 - lo[1], height - 1 - hi[1])
    mask = np.zeros((height, width), dtype=np.uint8)
    for i, poly in enumerate(polys):
        pts = _fixed(poly + [cx, cy])
        cv2.fillPoly(mask, [pts], 255 if i == 0 else 0, cv2.LINE_AA, _SHIFT)
    return mask.astype(np.float32) / 255.0


def _texture(rng, height, width, base):
    """A fill pattern around colour ``base`` (RGB floats), as (H, W, 3) float32."""
    kind = rng.integers(0, 5)
    base = base.astype(np.float32)
    other = np.clip(base + rng.uniform(-0.25, 0.25, size=3), 0, 1).astype(np.float32)
    if kind == 0:  # solid
        return np.broadcast_to(base, (height, width, 3))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 1:  # gradient
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base * (1 - t[..., None]) + other * t[..., None]
    if kind == 2:  # stripes
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(3, 9)
        t = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        on = (np.floor(t) % 2 == 0)[..., None]
        return np.where(on, base, other)
    if kind == 3:  # checker
        period = rng.uniform(3, 8)
        on = ((np.floor(xs / period) + np.floor(ys / period)) % 2 == 0)[..., None]
        return np.where(on, base, other)
    speckle = rng.normal(0, 0.08, size=(height, width, 1)).astype(np.float32)
    return np.clip(base + speckle, 0, 1)


def _object_size(rng):
    lo, hi = _SMALL_SIZE if rng.uniform() < _SMALL_FRACTION else _LARGE_SIZE
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def render_quickstart_image(seed_sequence, dataset=QUICKSTART):
    """
    Render one picture and its objects.

    Args:
        seed_sequence (np.random.SeedSequence): the picture's own seed; the same seed gives the
            same picture and annotations.
        dataset (ShapesDataset): the classes and background style to draw.

    Returns:
        tuple[ndarray, list[dict]]: the picture as (H, W, 3) uint8 RGB, and per visible object a
        dict with ``category_id`` (1..number of classes), ``bbox`` (XYWH, absolute pixels) and
        ``area`` (visible pixels).
    """
    classes = dataset.classes
    rng = np.random.Generator(np.random.PCG64(seed_sequence))
    width = int(rng.choice(_IMAGE_SIDES))
    height = int(rng.choice(_IMAGE_SIDES))
    if dataset.background == "tiles":
        img = _tiles_background(rng, height, width)
    else:
        img = _background(rng, height, width)

    num_objects = int(rng.choice(_NUM_OBJECTS, p=_NUM_OBJECTS_P))
    categories, visible = [], []
    for _ in range(num_objects):
        category = int(rng.integers(0, len(classes)))
        size = _object_size(rng)
        for _attempt in range(20):
            alpha = _shape_alpha(rng, classes[category], height, width, size)
            # Occlusion is fine, but every object must stay recognisable.
            if all(
                (v * (1 - alpha)).sum() >= _MIN_VISIBLE_FRACTION * v0 for v, v0 in visible
            ) and all(_overlap(alpha, v) < _MAX_OVERLAP for v, _ in visible):
                break
        else:
            continue

        # Choose a colour that stands out from what lies underneath.
        weight = alpha[..., None]
        under = (img * weight).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-6)
        for _attempt in range(20):
            color = _random_color(rng)
            if np.abs(color - under).sum() > _MIN_CONTRAST:
                break
        tex = _texture(rng, height, width, color)
        img = img * (1 - weight) + tex * weight

        visible = [(v * (1 - alpha), v0) for v, v0 in visible]
        visible.append((alpha, float(alpha.sum())))
        categories.append(category)

    # Sensor noise and, sometimes, a slight blur over the whole picture.
    if rng.uniform() < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 0.8))
    img = img + rng.normal(0, rng.uniform(0.01, 0.03), size=img.shape).astype(np.float32)
    img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)

    objects = []
    for category, (vis, _) in zip(categories, visible):
        ys, xs = np.nonzero(vis > 0.5)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append(
            {
                "category_id": category + 1,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(len(xs)),
            }
        )
    return img, objects


def _overlap(a, b):
    """Fraction of the smaller shape covered by the other (soft masks)."""
    inter = float(np.minimum(a, b).sum())
    return inter / max(min(float(a.sum()), float(b.sum())), 1e-6)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _split_seed(seed, split):
    return [int(seed), _SPLITS.index(split)]


def _write_split(out_dir, split, num_images, seed, dataset=QUICKSTART):
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        # One seed per picture: the first pictures do not depend on how many are generated.
        img, objects = render_quickstart_image(
            np.random.SeedSequence(_split_seed(seed, split) + [index]), dataset
        )
        file_name = f"{index:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"could not encode {dataset.name} image {split}/{file_name}")
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(buf.tobytes())
        images.append(
            {"id": index + 1, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
        )
        for obj in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **obj}
            )
    coco = {
        "info": {
            "description": f"Deformable DETR {dataset.name} shapes, {split} split",
            "version": str(_version(dataset)),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(dataset.classes)
        ],
    }
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    with open(os.path.join(out_dir, "annotations", f"{split}.json"), "w") as f:
        json.dump(coco, f, indent=None, separators=(",", ":"))
    return {"images": len(images), "annotations": len(annotations)}


def generate_quickstart_dataset(
    output_dir,
    num_train=DEFAULT_NUM_TRAIN,
    num_val=DEFAULT_NUM_VAL,
    seed=DEFAULT_SEED,
    dataset=QUICKSTART,
):
    """
    Write the dataset into ``output_dir`` (created if needed), manifest last. Not atomic: use
    :func:`ensure_quickstart_dataset` for a cache that others may read.

    Args:
        output_dir (str): folder to write into.
        num_train (int): pictures in the train split.
        num_val (int): pictures in the val split.
        seed (int): base seed; the same arguments always give the same bytes.
        dataset (ShapesDataset): which dataset.

    Returns:
        dict: the manifest that was written.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    os.makedirs(output_dir, exist_ok=True)
    counts = {"train": num_train, "val": num_val}
    write = _write_split
    if dataset is not QUICKSTART:
        write = functools.partial(_write_split, dataset=dataset)
    manifest = {
        "generator_version": _version(dataset),
        "seed": int(seed),
        "classes": list(dataset.classes),
        "splits": {s: write(output_dir, s, int(counts[s]), seed) for s in _SPLITS},
    }
    with open(os.path.join(output_dir, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def _is_complete(root, num_train, num_val, seed, dataset=QUICKSTART):
    try:
        with open(os.path.join(root, _MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if (
        manifest.get("generator_version") != _version(dataset)
        or manifest.get("seed") != seed
        or manifest.get("classes") != list(dataset.classes)
    ):
        return False
    counts = {"train": num_train, "val": num_val}
    for split in _SPLITS:
        info = manifest.get("splits", {}).get(split, {})
        if info.get("images") != counts[split]:
            return False
        if not os.path.isfile(os.path.join(root, "annotations", f"{split}.json")):
            return False
        image_dir = os.path.join(root, split)
        if not os.path.isdir(image_dir) or len(os.listdir(image_dir)) != counts[split]:
            return False
    return True


def ensure_quickstart_dataset(
    root=None,
    num_train=DEFAULT_NUM_TRAIN,
    num_val=DEFAULT_NUM_VAL,
    seed=DEFAULT_SEED,
    dataset=QUICKSTART,
):
    """
    Make sure a complete, current copy of the dataset is at ``root``; generate it otherwise.

    The dataset is written into a temporary folder beside ``root`` and renamed into place, so an
    interrupted generation never leaves a partial dataset and concurrent processes (several
    training workers) end up with one complete copy.

    Args:
        root (str or None): dataset folder; None means :func:`default_quickstart_root`.
        num_train, num_val, seed, dataset: as in :func:`generate_quickstart_dataset`.

    Returns:
        str: the absolute dataset folder.
    """
    root = os.path.abspath(root or default_quickstart_root(dataset))
    if _is_complete(root, num_train, num_val, seed, dataset):
        return root
    parent = os.path.dirname(root)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the quickstart dataset folder {parent!r}: {e}") from e

    logger.info(f"Generating the {dataset.name} dataset in {root} ...")
    tmp = tempfile.mkdtemp(prefix=f".{dataset.name}-tmp-", dir=parent)
    try:
        generate_quickstart_dataset(tmp, num_train, num_val, seed, dataset)
        stale = []
        try:
            for _attempt in range(3):
                if _is_complete(root, num_train, num_val, seed, dataset):
                    # Another process finished first.
                    break
                if os.path.lexists(root):
                    # Swap the outdated copy out and the new one in at once; delete the old one
                    # only afterwards, so that the folder is missing for the shortest time.
                    stale.append(tempfile.mkdtemp(prefix=".quickstart-old-", dir=parent))
                    try:
                        os.replace(root, os.path.join(stale[-1], "dataset"))
                    except FileNotFoundError:
                        pass  # someone else moved it away
                try:
                    os.rename(tmp, root)
                    break
                except OSError:
                    continue  # someone else put a folder there in the meantime: check it again
            else:
                raise RuntimeError(f"could not move the generated quickstart dataset to {root!r}")
        finally:
            for folder in stale:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(root, num_train, num_val, seed, dataset):
        raise RuntimeError(f"the {dataset.name} dataset in {root!r} is incomplete after generation")
    logger.info(f"{dataset.name} dataset ready in {root}")
    return root


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _load_split(root, split, num_train, num_val, seed, dataset):
    ensure_quickstart_dataset(root, num_train, num_val, seed, dataset)
    return load_coco_json(
        os.path.join(root, "annotations", f"{split}.json"),
        os.path.join(root, split),
        f"{dataset.name}_{split}",
    )


def register_shapes_datasets(
    dataset, root=None, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, seed=DEFAULT_SEED
):
    """
    Register ``<name>_train`` and ``<name>_val`` of a shapes dataset in Detectron2's catalogs.
    Cheap: the pictures are generated when either dataset is first read. Calling it again
    replaces the earlier registration (for example to point at another root).

    Args:
        dataset (ShapesDataset): :data:`QUICKSTART` or :data:`SHAPES_FINETUNE`.
        root (str or None): dataset folder; None means :func:`default_quickstart_root`.
        num_train, num_val, seed: as in :func:`generate_quickstart_dataset`.
    """
    root = os.path.abspath(root or default_quickstart_root(dataset))
    for split in _SPLITS:
        name = f"{dataset.name}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name,
            lambda split=split: _load_split(root, split, num_train, num_val, seed, dataset),
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(dataset.classes),
            thing_colors=[list(c) for c in dataset.colors],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(dataset.classes))},
            evaluator_type="coco",
            json_file=os.path.join(root, "annotations", f"{split}.json"),
            image_root=os.path.join(root, split),
            dataset_root=root,
        )


def register_quickstart_datasets(
    root=None, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, seed=DEFAULT_SEED
):
    """
    Register ``quickstart_train`` and ``quickstart_val`` (see :func:`register_shapes_datasets`).

    Args:
        root (str or None): dataset folder; None means :func:`default_quickstart_root`.
        num_train, num_val, seed: as in :func:`generate_quickstart_dataset`.
    """
    register_shapes_datasets(QUICKSTART, root, num_train, num_val, seed)
