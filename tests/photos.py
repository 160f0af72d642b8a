"""A user's own photos: folders of real photos (scikit-image's) as people have them, mixed
formats, modes, sizes and EXIF orientations, in class folders or unlabelled."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image
from skimage import data as skdata

# class -> the real photo its images are cut from; one class rarer than the others
CLASSES = {"cat": skdata.chelsea, "coffee": skdata.coffee, "rocket": skdata.rocket}
PER_CLASS = {"cat": 14, "coffee": 14, "rocket": 7}
ORIENTATION = 0x0112
# (suffix, how the file is written): every way a photo folder holds an image
FORMATS = ("jpeg-rgb", "png-rgb", "png-gray", "png-rgba", "jpeg-cmyk", "jpeg-exif-rotated",
           "jpg-small")


def _cut(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of 60-100% of each side, resized to 48-320 px, sometimes mirrored."""
    width, height = photo.size
    w, h = int(width * rng.uniform(0.6, 1.0)), int(height * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    crop = photo.crop((left, top, left + w, top + h))
    side = rng.randint(48, 320)
    crop = crop.resize((side, max(16, round(side * h / w))))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def save(image: Image.Image, stem: Path, kind: str) -> Path:
    if kind == "jpeg-rgb":
        path = stem.with_suffix(".jpeg")
        image.save(path, "JPEG", quality=90)
    elif kind == "png-rgb":
        path = stem.with_suffix(".png")
        image.save(path, "PNG")
    elif kind == "png-gray":
        path = stem.with_suffix(".png")
        image.convert("L").save(path, "PNG")
    elif kind == "png-rgba":
        path = stem.with_suffix(".png")
        rgba = image.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(path, "PNG")
    elif kind == "jpeg-cmyk":
        path = stem.with_suffix(".jpg")
        image.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "jpeg-exif-rotated":  # stored sideways, upright once the tag is applied
        path = stem.with_suffix(".JPG")
        exif = image.getexif()
        exif[ORIENTATION] = 6  # display = rotate the stored pixels 90 degrees clockwise
        image.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif.tobytes())
    else:
        path = stem.with_suffix(".jpg")
        image.resize((24, 24)).save(path, "JPEG", quality=80)
    return path


def write_class_folders(root: Path, seed: int = 0) -> dict[str, list[Path]]:
    """root/<class>/<files> in every format; returns the files per class."""
    rng = random.Random(seed)
    written: dict[str, list[Path]] = {}
    for name, load in CLASSES.items():
        photo = Image.fromarray(load()).convert("RGB")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        written[name] = [save(_cut(photo, rng), folder / f"IMG_{i:04d}", FORMATS[i % len(FORMATS)])
                         for i in range(PER_CLASS[name])]
    return written


def write_unlabelled(root: Path, count: int, seed: int = 1) -> dict[Path, str]:
    """count images of the classes, mixed, in one flat folder; returns {file: its class}."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    photos = {name: Image.fromarray(load()).convert("RGB") for name, load in CLASSES.items()}
    truth = {}
    for i in range(count):
        name = rng.choice(list(photos))
        truth[save(_cut(photos[name], rng), root / f"DSC{i:05d}", FORMATS[i % len(FORMATS)])] = name
    return truth
