"""A synthetic COCO-format detection data set: textured shapes on cluttered backgrounds.

Each class is a shape. Every object gets a random colour pair, texture (solid, striped,
checkered, dotted), rotation and size (6 px to half the image by default, log-uniform so small objects
are common), so a detector has to learn shape rather than colour or texture. Objects overlap,
and sit on gradients with distractor strokes and blobs that are not objects, under colour
jitter and Gaussian noise: enough headroom for a bigger detector to beat a smaller one.

Annotations describe what is visible: a box is the extent of an object's visible pixels and
its area their count. Objects are placed topmost first, so each one's occlusion is known when
it is placed; one showing less than ``MIN_VISIBLE`` of its pixels (hidden by objects above it
or cut by the border) is not drawn at all, so every object in an image is annotated.

Every image is drawn from its own generator seeded by ``(seed, split, index)``, and the files
hold no timestamps, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gid.errors import GidError

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
Texture = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

MIN_VISIBLE = 0.35  # fraction of an object's pixels that must show for it to be drawn
MAX_OBJECTS = 12
MIN_OBJECT_SIZE = 6.0  # diameter in pixels; the largest object spans half the image
SPLITS = ("train", "val", "test")


# Shapes in the object's rotated frame, scaled so the shape lies within the unit disk.
def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # equilateral, corners on the unit circle
    return (v >= -0.5) & (0.5 * v + 0.866 * np.abs(u) <= 0.5)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return (np.minimum(au, av) <= 0.3) & (np.maximum(au, av) <= 0.9)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # five points: the allowed radius falls from 1 at a point to 0.45 between two points
    t = (np.arctan2(v, u) * (5 / (2 * np.pi))) % 1.0
    return np.hypot(u, v) <= 0.45 + 1.1 * np.abs(t - 0.5)


SHAPES: dict[str, Mask] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
}
DEFAULT_CLASSES: tuple[str, ...] = tuple(SHAPES)


# Textures in pixel units of the object's frame, so they rotate with it; True = accent colour.
def _solid(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    return np.zeros(u.shape, dtype=bool)


def _striped(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    return np.floor(u * (2 / period)) % 2 == 1


def _checkered(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    return (np.floor(u * (2 / period)) + np.floor(v * (2 / period))) % 2 == 1


def _dotted(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    du, dv = u % period - period / 2, v % period - period / 2
    return du * du + dv * dv <= (0.3 * period) ** 2


TEXTURES: tuple[Texture, ...] = (_solid, _striped, _checkered, _dotted)


@dataclass(frozen=True)
class _Scene:
    shapes: Sequence[Mask]
    max_objects: int
    min_size: float  # smallest object diameter, pixels


def make_synthetic(
    out_dir: Path,
    *,
    train: int = 2000,
    val: int = 500,
    test: int = 0,
    image_size: int = 128,
    classes: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
    min_object_size: float = MIN_OBJECT_SIZE,
) -> Path:
    """Write the data set in COCO layout under ``out_dir`` and return ``out_dir``.

    Images go to ``out_dir/{split}/NNNNNN.png`` and annotations to
    ``out_dir/annotations/instances_{split}.json`` for each split with a positive count.
    ``classes`` picks shapes from :data:`SHAPES`; their order gives the category ids 1..C.
    Each image holds 1 to ``max_objects`` objects whose diameters run from ``min_object_size``
    pixels to half the image: fewer, larger objects make an easier data set.
    """
    counts = {"train": train, "val": val, "test": test}
    _check_args(counts, image_size, classes, seed, max_objects, min_object_size)
    scene = _Scene(shapes=[SHAPES[name] for name in classes], max_objects=max_objects, min_size=min_object_size)
    out_dir = Path(out_dir)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    # PNG encoding releases the GIL, so a writer thread overlaps it with drawing the next image
    with ThreadPoolExecutor(max_workers=2) as writer:
        for split_index, split in enumerate(SPLITS):
            if counts[split]:
                data = _make_split(writer, out_dir, split, split_index, counts[split], image_size, scene, seed)
                data["categories"] = categories
                (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(data) + "\n")
    return out_dir


def _make_split(
    writer: ThreadPoolExecutor,
    out_dir: Path,
    split: str,
    split_index: int,
    count: int,
    image_size: int,
    scene: _Scene,
    seed: int,
) -> dict[str, list]:
    """Write one split's images and return its COCO "images" and "annotations"."""
    (out_dir / split).mkdir(exist_ok=True)
    images, annotations = [], []
    pending: deque[Future] = deque()
    for index in range(count):
        image_id = index + 1
        file_name = f"{index:06d}.png"
        pixels, objects = render_image(np.random.default_rng([seed, split_index, index]), image_size, scene)
        pending.append(writer.submit(_save_png, pixels, out_dir / split / file_name))
        if len(pending) > 8:  # bounds the images held in memory; re-raises write errors
            pending.popleft().result()
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for label, bbox, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    for future in pending:
        future.result()
    return {"images": images, "annotations": annotations}


def _save_png(pixels: np.ndarray, path: Path) -> None:
    # noise leaves little to compress, so the fastest zlib level costs almost nothing in size
    Image.fromarray(pixels).save(path, compress_level=1)


def _check_args(
    counts: dict[str, int], image_size: int, classes: Sequence[str], seed: int, max_objects: int, min_object_size: float
) -> None:
    for split, count in counts.items():
        if count < 0:
            raise GidError(f"synthetic data: the number of {split} images must be >= 0, got {count}")
    if image_size < 32:
        raise GidError(f"synthetic data: image_size must be at least 32, got {image_size}")
    if seed < 0:
        raise GidError(f"synthetic data: seed must be >= 0, got {seed}")
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= SHAPES.keys():
        raise GidError(f"synthetic data: classes must be distinct names from {list(SHAPES)}, got {list(classes)}")
    if max_objects < 1:
        raise GidError(f"synthetic data: max_objects must be at least 1, got {max_objects}")
    if not 1 <= min_object_size <= image_size / 2:
        raise GidError(
            f"synthetic data: min_object_size must be between 1 and half the image ({image_size / 2:g} px), "
            f"got {min_object_size:g}"
        )


def render_image(
    rng: np.random.Generator, size: int, scene: _Scene
) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """One ``size`` x ``size`` RGB uint8 image and its ``(class index, xywh box, area)`` objects."""
    # drawn channels-first: numpy is slow on broadcasts whose innermost axis has length 3
    image = _background(rng, size)
    objects = _draw_objects(rng, image, scene)
    # colour jitter (contrast about the mean, then brightness) and luminance noise over everything
    contrast, brightness = rng.uniform(0.6, 1.4), rng.uniform(0.7, 1.3)
    offset = float(image.mean() * (1 - contrast) * brightness)
    image = image * float(contrast * brightness) + offset
    image += rng.standard_normal((1, size, size), dtype=np.float32) * float(rng.uniform(0.0, 0.06))
    pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0)), objects


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A CHW two-colour linear gradient under soft elliptical blobs and hard strokes."""
    start, end = rng.uniform(0.0, 1.0, (2, 3, 1)).astype(np.float32)
    angle = rng.uniform(0.0, 2 * np.pi)
    # t = (x cos + y sin) rescaled to [0, 1] over the image, summed from its x and y parts
    coords = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    tx, ty = coords * math.cos(angle), coords * math.sin(angle)
    span = (np.ptp(tx) + np.ptp(ty)) / (end - start)
    image = (start + (tx - tx.min() - ty.min()) / span)[:, None, :] + (ty / span)[:, :, None]
    for _ in range(rng.integers(0, 5)):
        cx, cy = rng.uniform(0, size, 2).tolist()
        sx, sy = rng.uniform(size / 16, size / 4, 2).tolist()
        ys, xs, dy, dx = _window(cx, cy, 3 * sx, 3 * sy, size)
        alpha = rng.uniform(0.3, 0.8) * np.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))
        region = image[:, ys, xs]
        region += alpha * (rng.uniform(0.0, 1.0, (3, 1, 1)).astype(np.float32) - region)
    for _ in range(rng.integers(0, 7)):
        ax, ay, bx, by = rng.uniform(0, size, 4).tolist()
        half_width = rng.uniform(0.5, 1.5)
        ys, xs, dy, dx = _window(
            (ax + bx) / 2, (ay + by) / 2, abs(bx - ax) / 2 + half_width, abs(by - ay) / 2 + half_width, size
        )
        # distance from each pixel centre to the segment a-b
        ex, ey = bx - ax, by - ay
        dx, dy = dx + (ex / 2), dy + (ey / 2)  # offsets from a
        s = np.clip((dx * ex + dy * ey) / max(ex * ex + ey * ey, 1e-6), 0.0, 1.0)
        near = (dx - s * ex) ** 2 + (dy - s * ey) ** 2 <= half_width**2
        image[:, ys, xs][:, near] = rng.uniform(0.0, 1.0, (3, 1))
    return image


def _window(cx: float, cy: float, rx: float, ry: float, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Image rows and columns within ``rx``, ``ry`` of a centre, and their pixel-centre offsets from it."""
    ys = slice(max(math.floor(cy - ry), 0), min(math.ceil(cy + ry), size))
    xs = slice(max(math.floor(cx - rx), 0), min(math.ceil(cx + rx), size))
    dy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None] + (0.5 - cy)
    dx = np.arange(xs.start, xs.stop, dtype=np.float32)[None, :] + (0.5 - cx)
    return ys, xs, dy, dx


def _draw_objects(
    rng: np.random.Generator, image: np.ndarray, scene: _Scene
) -> list[tuple[int, list[float], float]]:
    """Draw 1 to ``scene.max_objects`` objects into CHW ``image``, topmost first, and return the visible ones.

    A centre at least half a radius from the border keeps most of the first (topmost) object
    inside the image, so every image has at least one object.
    """
    size = image.shape[-1]
    covered = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(rng.integers(1, scene.max_objects + 1)):
        label = int(rng.integers(len(scene.shapes)))
        diameter = math.exp(rng.uniform(math.log(scene.min_size), math.log(size / 2)))
        radius = diameter / 2
        cx, cy = rng.uniform(radius / 2, size - radius / 2, 2).tolist()
        angle = rng.uniform(0.0, 2 * np.pi)
        # the object's bounding square, maybe partly outside the image, in the rotated frame
        x0, y0 = math.floor(cx - radius), math.floor(cy - radius)
        dx = np.arange(x0, math.ceil(cx + radius), dtype=np.float32)[None, :] + (0.5 - cx)
        dy = np.arange(y0, math.ceil(cy + radius), dtype=np.float32)[:, None] + (0.5 - cy)
        cos, sin = math.cos(angle), math.sin(angle)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        mask = scene.shapes[label](u / radius, v / radius)
        inside = np.s_[max(-y0, 0) : size - y0, max(-x0, 0) : size - x0]
        window = np.s_[max(y0, 0) : y0 + mask.shape[0], max(x0, 0) : x0 + mask.shape[1]]
        full_area = mask.sum()
        mask, u, v = mask[inside], u[inside], v[inside]
        visible = mask & ~covered[window]
        area = int(visible.sum())
        if area < MIN_VISIBLE * full_area:
            continue
        covered[window] |= mask
        colours = rng.uniform(0.0, 1.0, (3, 2)).astype(np.float32)  # base, accent
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        accent = texture(u, v, rng.uniform(3.0, max(3.0, diameter / 3)))
        image[(slice(None), *window)][:, visible] = colours[:, accent[visible].astype(np.intp)]
        objects.append((label, _extent(visible, window), float(area)))
    return objects


def _extent(visible: np.ndarray, window: tuple[slice, slice]) -> list[float]:
    """COCO ``[x, y, w, h]`` box around the True pixels of ``visible`` placed at ``window``."""
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    x, y = window[1].start + cols[0], window[0].start + rows[0]
    return [float(x), float(y), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
