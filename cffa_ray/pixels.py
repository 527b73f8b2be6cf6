"""Image files -> uint8 pixels of one modality, converted on purpose and never clipped.

CF (colour fundus) becomes RGB, FA (angiogram) becomes grey (L). Every file is read through
`open_image`, which turns it upright by its EXIF orientation tag (a camera's or phone's JPEG, a TIFF,
a PNG with an eXIf chunk), as image viewers show it: otherwise the stored pixels of a rotated CF would
be trained against an upright FA, misregistered without a word. The conversions:

* 16-bit grey PNG/TIFF (PIL modes I;16*) are scaled by 255/65535 (PIL's own convert would clip
  every value above 255 to white); 32-bit integer images by 255/65535 when their values fit in 16
  bits, else by their maximum; float images in [0, 1] by 255, others by their maximum (negatives
  become 0). 16-bit-per-channel colour files PIL already reduces to their high byte (exact scaling).
* Transparency (RGBA, LA, palette with a transparent colour) is composited over black: outside the
  fundus disc retinal images are black, and a transparent border means "no image here".
* Palette, CMYK and other colour modes are expanded to RGB first.
* A grey CF is replicated to three equal channels; a colour FA is reduced to grey by luminance
  (ITU-R 601-2, PIL's "L"). Both are also reported as warnings: they usually mean cf/ and fa/ are
  swapped or an export went wrong.

`read_pair` also reports what resizing to --resolution does to the pair (different sizes, non-square,
much smaller than --resolution) as warnings; see WARNINGS.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# warning kind -> (what the listed files have in common, what it means); the driver counts them.
WARNINGS = {
    "pair_size": ("pairs whose CF and FA differ in size or shape",
                  "each is resized to the square --resolution on its own, so the two stay registered "
                  "only if they show exactly the same field"),
    "not_square": ("images that are not square", "they are squashed to the square --resolution"),
    "small": ("images much smaller than --resolution (under half of it)",
              "upscaled more than 2x, they come out blurred"),
    "grey_cf": ("CF images that are greyscale",
                "used as RGB with three equal channels (if cf/ and fa/ are swapped, swap them back)"),
    "colour_fa": ("FA images in colour", "reduced to grey by luminance (if cf/ and fa/ are swapped, swap them back)"),
    "transparent": ("images with transparent pixels", "composited over black"),
    "huge": (f"images over PIL's decompression-bomb limit ({(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels)",
             "decoded anyway, at several hundred MB of memory each in every decoding task: downscale them"),
}
COLOUR_FA_CHROMA = 8.0  # mean max-min channel spread (grey levels) above which an FA counts as colour


class ImageReadError(ValueError):
    """The file is not an image PIL can decode; the message says why, without the path."""


def open_image(data: bytes) -> Image.Image:
    """Decode every pixel now (a truncated file fails here, not halfway through a resize), upright by its
    EXIF orientation. PIL's DecompressionBombWarning is not printed: `geometry_warnings` reports such
    files with the other image warnings (a file over twice the limit is an ImageReadError)."""
    if not data:
        raise ImageReadError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise ImageReadError("not a PNG, JPEG or TIFF image that PIL can read") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageReadError(f"{type(e).__name__}: {e}".rstrip(": ")) from None
    return upright(image)


def upright(image: Image.Image) -> Image.Image:
    """The image turned and flipped as its EXIF orientation tag (2-8) says; as it is without one, or
    when its EXIF block will not parse (then its pixels are all there is to go by)."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # a damaged EXIF block: PIL raises many types
        pass
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images -> L, scaled by their bit depth (see module docstring)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if image.mode.startswith("I;16") or (image.mode == "I" and top <= 65535):
        scale = 65535.0 if top > 255 or image.mode != "I" else 255.0
    elif image.mode == "F" and top <= 1.0:
        scale = 1.0
    else:
        scale = top or 1.0
    return Image.fromarray(np.clip(np.round(values * (255.0 / scale)), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(image: Image.Image) -> tuple[Image.Image, bool]:
    """Composite transparency over black -> (RGB or L image (grey stays grey), had transparent pixels)."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        grey = image.mode in ("LA", "La")
        rgba = image.convert("RGBA")
        transparent = rgba.getextrema()[3][0] < 255
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        return (image.convert("L") if grey else image), transparent
    if image.mode == "1":
        return image.convert("L"), False
    if image.mode not in ("RGB", "L"):
        return image.convert("RGB"), False  # CMYK, YCbCr, LAB, HSV
    return image, False


def _chroma(image: Image.Image) -> float:
    """Mean spread between the largest and smallest channel, in grey levels (0 for a grey image)."""
    small = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.int16)
    return float((small.max(axis=-1) - small.min(axis=-1)).mean())


def to_modality(image: Image.Image, mode: str) -> tuple[Image.Image, list[str]]:
    """Any decoded image -> `mode` ("RGB" for CF, "L" for FA), with the warning kinds it earned."""
    image, transparent = _flatten_alpha(to_8bit(image))
    warnings = ["transparent"] if transparent else []
    if mode == "RGB":
        if image.mode == "L" or _chroma(image) == 0.0:
            warnings.append("grey_cf")
        return image.convert("RGB"), warnings
    if image.mode == "RGB" and _chroma(image) > COLOUR_FA_CHROMA:
        warnings.append("colour_fa")
    return image.convert("L"), warnings


def geometry_warnings(size: tuple[int, int], resolution: int) -> list[str]:
    """The WARNINGS kinds an image of `size` earns at --resolution: not_square, small, huge."""
    width, height = size
    out = [] if width == height else ["not_square"]
    if min(width, height) * 2 < resolution:
        out.append("small")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        out.append("huge")
    return out


def resize_square(image: Image.Image, resolution: int) -> np.ndarray:
    """-> uint8 [R, R, 3] (grey is replicated to three channels, as the models take it)."""
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return np.repeat(array[..., None], 3, axis=-1) if image.mode == "L" else array


def short_name(path: str) -> str:
    """The last two parts of a path (cf/x.png): enough to find the file in a warning."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else os.path.basename(path)


def describe(kind: str, path: str, size: tuple[int, int], other: tuple[int, int] | None = None) -> str:
    """One warning entry: 'kind<TAB>file (details)'; the driver groups entries by kind."""
    detail = f"{size[0]}x{size[1]}"
    if other is not None:
        detail = f"{detail} vs its partner's {other[0]}x{other[1]}"
    return f"{kind}\t{short_name(path)} {detail}"
