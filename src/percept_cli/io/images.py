"""Reading image files (or encoded images in memory: tar members) into RGB, robustly; finding images in folders.

Every failure is an :class:`ImageReadError` naming the file: missing, a
directory, not an image, truncated or corrupt, too small (< MIN_SIDE pixels on
a side), or larger than Pillow's decompression-bomb limit. Valid but unusual
files are converted to 8-bit RGB the way a person would expect: EXIF rotation
applied, transparency composited over white, 16-bit and float images rescaled,
palette/grayscale/CMYK converted.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadInputError, ImageReadError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
MIN_SIDE = 8  # smaller images carry no perceptual content worth a distance
_BACKGROUND = (255, 255, 255)  # transparency is composited over white
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a regular file, in words; None when it can be opened.

    ``"file not found"``, ``"is a directory, not a file"``, ``"symlink loop"``,
    ``"broken symlink (its target X does not exist)"``, ``"not a regular file (a device, pipe or socket)"``,
    ``"permission denied"``.
    """
    import errno
    import os
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link points back to itself)"
        if exc.errno == errno.EACCES:
            return "permission denied"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return f"broken symlink (its target {os.readlink(path)} does not exist)"
        if exc.errno == errno.ENOTDIR:
            return "file not found (a parent in the path is not a directory)"
        return "file not found" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _open(path: Path) -> Image.Image:
    """Open ``path`` lazily (header only), mapping every failure to ImageReadError."""
    problem = path_problem(path)
    if problem is not None:
        raise ImageReadError(path, "is a directory, not an image file" if problem.startswith("is a directory")
                             else problem)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return _open_source(path, path)


def _open_source(source: Path | BinaryIO, name: str | Path) -> Image.Image:
    """Open a file path or a binary stream lazily (header only); failures are ImageReadErrors naming ``name``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"image is too large to decode safely ({exc})",
                             "Raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file.") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, "not an image, or a format Pillow cannot read") from exc
    except OSError as exc:
        raise ImageReadError(name, f"cannot be read ({exc})") from exc
    width, height = img.size
    if min(width, height) < MIN_SIDE:
        img.close()
        raise ImageReadError(name, f"image is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    return img


def check_image(path: str | Path) -> tuple[int, int]:
    """Cheap validation without decoding pixels: header, size limits, and (PNG, GIF) chunk integrity.

    Returns:
        (width, height) of the stored image.

    Raises:
        ImageReadError: the file would fail :func:`read_image` for a reason visible here.
    """
    path = Path(path)
    img = _open(path)
    size = img.size
    try:
        img.verify()  # checks PNG chunk CRCs and truncation without decompressing
    except Exception as exc:  # Pillow raises many types (SyntaxError, OSError, struct.error) for corrupt data
        raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from exc
    finally:
        img.close()
    return size


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image (EXIF rotation applied).

    Raises:
        ImageReadError: missing, not an image, truncated/corrupt, too small or too large.
    """
    path = Path(path)
    return _decode(_open(path), path)


def read_image_bytes(data: bytes, name: str | Path) -> Image.Image:
    """Decode an encoded image held in memory (e.g. a tar member) exactly as :func:`read_image` decodes a file.

    Raises:
        ImageReadError: naming ``name``, with the reasons :func:`read_image` gives for a file
        (empty, not an image, truncated/corrupt, too small or too large).
    """
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    return _decode(_open_source(io.BytesIO(data), name), name)


def _decode(img: Image.Image, name: str | Path) -> Image.Image:
    """Load the pixels of a lazily opened image and convert them to RGB; bad data is an ImageReadError."""
    try:
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for bad data
        img.close()
        raise ImageReadError(name, f"truncated or corrupt image data ({exc})") from exc
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, applying its EXIF orientation."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the stored orientation rather than fail
        pass
    mode = img.mode
    if mode in _HIGH_BIT_MODES or mode == "F":
        img = _high_bit_to_l(img)
        mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit 'L', scaling the full range to 0..255."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale)
    else:
        arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def is_image_file(path: Path) -> bool:
    """True for a regular file with a known image extension."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def list_images(directory: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``directory``, sorted by relative path.

    Raises:
        BadInputError: the directory does not exist or holds no image files.
    """
    root = Path(directory)
    if not root.is_dir():
        problem = path_problem(root)
        raise BadInputError(f"{root}: {'not a directory' if problem is None else problem}.")
    pattern = root.rglob("*") if recursive else root.iterdir()
    files = sorted((p for p in pattern if is_image_file(p)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        where = "" if recursive else " directly in it (subdirectories are not searched)"
        raise BadInputError(f"{root}: no image files found{where}.", f"Recognised extensions: {kinds}.",
                            option_hints={} if recursive else {
                                "--recursive": "Use --recursive to look in subdirectories."})
    return files
