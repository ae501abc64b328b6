"""Image folders as DATA: how an image becomes a model input (`--preprocess`), and reading one.

The declaration (`parse_preprocess`) names torchvision's steps: resize=N (shorter side to N, aspect kept, then a
center crop to the input's size) or resize=HxW (exactly), crop=N or HxW (center), then
x = (pixel * scale - mean) / std per channel (scale defaults to 1/255, torchvision's ToTensor), channels=RGB|BGR,
layout=NCHW|NHWC. `resolve` fills in what the model's one input says (size, layout from a 4-D [1,C,H,W] or
[1,H,W,C] with C = 1 or 3, dtype) and refuses what it cannot say. Normalization is never guessed for a float input:
the declaration must name scale, mean or std. An integer input with a scale and zero point (a full-integer TFLite
model's) takes the declared normalization quantized as TFLite's QUANTIZE does; undeclared, uint8 inputs take the
pixels as they are and int8 inputs pixel - 128, which only a model whose input quantization makes those pixels
0..1, -1..1 or 0..255 may take (others are refused: their float range says another normalization).

Images are decoded by Pillow, an optional dependency (`pip install 'edgec[images]'`); resizing is Pillow's bilinear
filter (antialiased when shrinking), as torchvision's Resize on a PIL image.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .dataset import _dims, _shown
from .errors import EdgecError
from .signature import TensorSpec

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
KEYS = ("resize", "crop", "scale", "mean", "std", "channels", "layout")
EXAMPLE = "--preprocess resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"
_INSTALL = "pip install 'edgec[images]'"
# 8-bit modes Pillow converts to RGB / L; 16-bit and float images ("I;16", "I", "F") would not be 0..255 pixels
_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}


@dataclass(frozen=True)
class Preprocess:
    """--preprocess as declared; None: taken from the model's input (see resolve)."""
    resize: tuple[int, ...] | None = None    # (N,): shorter side to N; (H, W): exactly
    crop: tuple[int, int] | None = None      # (H, W), centered
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: str | None = None              # RGB | BGR
    layout: str | None = None                # NCHW | NHWC


def _bad(key: str, value: str, wanted: str):
    return EdgecError(f"--preprocess {key}={_shown(value)} is not {wanted}", f"e.g. {EXAMPLE}")


def _size(key: str, value: str) -> tuple[int, ...]:
    parts = value.lower().split("x")
    if len(parts) > 2 or not all(p.isdecimal() and int(p) > 0 for p in parts):   # isdigit takes '²'; int does not
        raise _bad(key, value, "a size N or HxW (height x width)")
    return tuple(int(p) for p in parts)


def _number(key: str, value: str, positive: bool) -> float:
    try:   # scale=1/255 reads as a fraction
        number = float(Fraction(value)) if "/" in value else float(value)
    except (ValueError, ArithmeticError):   # 1/0; a fraction beyond float's range
        number = float("nan")
    if not np.isfinite(number) or (positive and number <= 0):
        raise _bad(key, value, "a positive number" if positive else "a number")
    return number


def parse_preprocess(text: str) -> Preprocess:
    """`resize=256,crop=224,mean=0.485,0.456,0.406,...`: comma-separated KEY=VALUE; a value without a key continues
    the list of the key before it (mean and std take one value or one per channel)."""
    values: dict[str, list[str]] = {}
    key = None
    for token in (t.strip() for t in text.split(",") if text.strip()):
        name, eq, value = token.partition("=")
        if eq:
            key = name.strip().lower()
            if key not in KEYS:
                raise EdgecError(f"--preprocess has an unknown key '{_shown(name.strip())}'",
                                 f"keys: {', '.join(KEYS)}; e.g. {EXAMPLE}")
            if key in values:
                raise EdgecError(f"--preprocess gives {key} twice", "give each key once")
            values[key] = [value.strip()]
        elif key is None or not token:
            raise EdgecError(f"--preprocess '{_shown(text)}' is not KEY=VALUE pairs separated by commas",
                             f"e.g. {EXAMPLE}")
        else:
            values[key].append(token)
    for key, given in values.items():
        if len(given) > 1 and key not in ("mean", "std"):
            raise _bad(key, ",".join(given), "one value")
    one = {k: v[0] for k, v in values.items()}
    choice = {}
    for key, allowed in (("channels", ("RGB", "BGR")), ("layout", ("NCHW", "NHWC"))):
        if key in one:
            choice[key] = one[key].upper()
            if choice[key] not in allowed:
                raise _bad(key, one[key], " or ".join(allowed))
    crop = _size("crop", one["crop"]) if "crop" in one else None
    return Preprocess(
        resize=_size("resize", one["resize"]) if "resize" in one else None,
        crop=crop and (crop * 2 if len(crop) == 1 else crop),
        scale=_number("scale", one["scale"], positive=True) if "scale" in one else None,
        mean=tuple(_number("mean", v, positive=False) for v in values["mean"]) if "mean" in values else None,
        std=tuple(_number("std", v, positive=True) for v in values["std"]) if "std" in values else None,
        **choice)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise EdgecError("reading an image folder needs Pillow, which is not installed",
                         f"install it with {_INSTALL}") from None
    return Image


@dataclass(frozen=True)
class ImageInput:
    """How one image becomes a sample of the model's one input: the declaration with the input's defaults."""
    spec: TensorSpec
    size: tuple[int, int]                 # (H, W) the input takes
    channels_first: bool
    gray: bool                            # one channel: Pillow's luma ('L', ITU-R 601-2)
    bgr: bool
    resize: tuple[int, ...] | None
    crop: tuple[int, int] | None
    scale: float | None                   # None with mean and std for an integer input: pixels as they are
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    quantization: tuple[float, int] | None   # the integer input's (scale, zero point), where the model gives them

    def describe(self) -> str:
        # all a deployment needs to feed the model the same numbers: the filter, the rounding, the float32 values
        steps = []
        if self.resize:
            steps.append(f"resize={_size_text(self.resize)} ("
                         + ("shorter side, the other int(N * long / short); " if len(self.resize) == 1 else "")
                         + "Pillow's bilinear, antialiased)")
        if self.crop:
            steps.append(f"crop={_size_text(self.crop)} (center, offsets round((side - crop) / 2))")
        steps.append("gray (Pillow's luma, ITU-R 601-2)" if self.gray else "BGR" if self.bgr else "RGB")
        if self.scale is not None:
            steps.append(f"(pixel*{_values((self.scale,))} - mean {_values(self.mean)}) / std {_values(self.std)} "
                         "in float32")
            if self.quantization is not None:
                steps.append(f"quantized with scale {_values(self.quantization[:1])}, zero point "
                             f"{self.quantization[1]} (round half away from zero, saturated)")
        else:
            steps.append(("pixel - 128" if self.spec.dtype == "int8" else "pixel")
                         + (f" (input scale {_values(self.quantization[:1])}, zero point {self.quantization[1]})"
                            if self.quantization is not None else ""))
        layout = "NCHW" if self.channels_first else "NHWC"
        return f"{', '.join(steps)}, {layout if len(self.spec.shape) == 4 else layout[1:]} {self.spec.dtype}"

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resize, as torchvision computes it (the long side truncated)."""
        if self.resize is None:
            return width, height
        if len(self.resize) == 2:
            return self.resize[1], self.resize[0]
        n = self.resize[0]
        return (n, int(n * height / width)) if width <= height else (int(n * width / height), n)

    def check(self, name: str, width: int, height: int) -> None:
        """Refuse an image (its header's size) that the declared resize and crop do not bring to the input's."""
        w, h = self._resized(width, height)
        what = f"image '{name}' is {height}x{width} (HxW)" + (f", {h}x{w} after resize" if self.resize else "")
        if self.crop and (h < self.crop[0] or w < self.crop[1]):
            raise EdgecError(f"{what}, smaller than crop={_size_text(self.crop)}",
                             "resize it first (resize=N: shorter side) or crop less")
        if not self.crop and (h, w) != self.size:
            H, W = self.size
            raise EdgecError(f"{what}; input '{_shown(self.spec.name)}' takes {H}x{W}",
                             f"declare in --preprocess resize={min(H, W)} (shorter side, then a center crop to "
                             f"{H}x{W}) or resize={H}x{W} (stretched)")

    def array(self, image) -> np.ndarray:
        """The input array for a Pillow image (any of _MODES)."""
        Image = _pil()
        image = image.convert("L" if self.gray else "RGB")
        if self.resize:
            image = image.resize(self._resized(*image.size), Image.Resampling.BILINEAR)
        if self.crop:   # centered as torchvision's CenterCrop: offsets rounded
            h, w = self.crop
            top, left = int(round((image.height - h) / 2)), int(round((image.width - w) / 2))
            image = image.crop((left, top, left + w, top + h))
        pixels = np.asarray(image).reshape(*self.size, -1)
        if self.bgr:
            pixels = pixels[..., ::-1]
        if self.scale is not None:
            x = (pixels.astype(np.float32) * np.float32(self.scale) - np.float32(self.mean)) / np.float32(self.std)
            if self.quantization is not None:
                x = _quantize(x, *self.quantization, self.spec.dtype)
        else:
            x = _as_is(pixels, self.spec.dtype)
        if self.channels_first:
            x = x.transpose(2, 0, 1)
        return np.array(x.reshape(self.spec.shape), dtype=self.spec.dtype, order="C")


def _size_text(size: tuple[int, ...]) -> str:
    return "x".join(map(str, size))


def _values(values: tuple[float, ...]) -> str:
    """As float32, the precision they are applied in: the shortest text that reads back the same."""
    return ",".join(str(np.float32(v)) for v in values)


def _as_is(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """Pixels for an integer input with no declared normalization: uint8 as they are, int8 minus 128."""
    return pixels.astype(np.int16) - (128 if dtype == "int8" else 0)


def _quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """TFLite's QUANTIZE (reference_ops::AffineQuantize): x / scale in float32, rounded half away from zero, plus
    the zero point, saturated to the dtype."""
    q = x.astype(np.float32) / np.float32(scale)
    info = np.iinfo(dtype)
    return np.clip(np.sign(q) * np.floor(np.abs(q) + np.float32(0.5)) + zero_point, info.min, info.max)


# float ranges an integer input's pixels as they are may stand for: pixel/255, pixel/127.5 - 1, pixel
_PIXEL_RANGES = ((1 / 255, 0.0), (1 / 127.5, -1.0), (1.0, 0.0))


def _pixels_fit(quantization: tuple[float, int], dtype: str) -> bool:
    """Whether the pixels as they are (_as_is) are, within one step, the input's quantization of one of
    _PIXEL_RANGES: what they stand for is then a usual normalization, not a guess against the model's own."""
    pixels = np.arange(256, dtype=np.float32)
    return any(np.abs(_quantize(pixels * np.float32(a) + np.float32(b), *quantization, dtype)
                      - _as_is(pixels, dtype)).max() <= 1 for a, b in _PIXEL_RANGES)


def resolve(declared: Preprocess | None, specs: tuple[TensorSpec, ...],
            quantization: dict[str, tuple[float, int]] | None = None) -> ImageInput:
    """The declaration completed from the model's input, or an EdgecError saying what the images cannot tell.
    `quantization`: (scale, zero point) of integer inputs by name, where the model gives them."""
    d = declared or Preprocess()
    if len(specs) != 1:
        raise EdgecError(f"the model takes {len(specs)} inputs ({_shown(', '.join(s.name for s in specs))}) and an "
                         "image folder gives one array per image", "save the samples as .npz keyed by input name")
    spec = specs[0]
    name, shape = _shown(spec.name), spec.shape
    if len(shape) == 4 and shape[0] != 1:
        raise EdgecError(f"input '{name}' {_dims(shape)} takes {shape[0]} images per call and an image folder gives "
                         "one", f"build the model for one image: --input-shape {name}:1x...")
    if len(shape) not in (3, 4):
        raise EdgecError(f"input '{name}' {_dims(shape)} is not an image (NCHW or NHWC)",
                         "save the samples as .npz keyed by input name")
    c_first, c_last = shape[-3], shape[-1]
    if d.layout:
        channels_first = d.layout == "NCHW"
    elif (c_first in (1, 3)) != (c_last in (1, 3)):
        channels_first = c_first in (1, 3)
    elif c_first in (1, 3):
        raise EdgecError(f"input '{name}' {_dims(shape)} could be NCHW or NHWC",
                         "add layout=NCHW or layout=NHWC to --preprocess")
    else:
        raise EdgecError(f"input '{name}' {_dims(shape)} has no axis of 1 or 3 channels; images give 1 (gray) or 3 "
                         "(RGB)", "save the samples as .npz keyed by input name")
    channels = c_first if channels_first else c_last
    size = tuple(shape[-2:]) if channels_first else tuple(shape[-3:-1])
    if channels not in (1, 3):
        raise EdgecError(f"input '{name}' {_dims(shape)} takes {channels} channels as {d.layout}; images give 1 "
                         "(gray) or 3 (RGB)", "check layout=, or save the samples as .npz keyed by input name")
    if channels == 1 and d.channels == "BGR":
        raise EdgecError(f"input '{name}' {_dims(shape)} takes one (gray) channel; channels=BGR is for three",
                         "drop channels=BGR")
    norm = [k for k in ("scale", "mean", "std") if getattr(d, k) is not None]
    integer = spec.dtype in ("uint8", "int8")
    if not integer and not np.issubdtype(np.dtype(spec.dtype), np.floating):
        raise EdgecError(f"input '{name}' is {spec.dtype}; images go to float, uint8 or int8 inputs",
                         "save the samples as .npz keyed by input name")
    quantized = (quantization or {}).get(spec.name) if integer else None
    as_is = "their pixels" + (" minus 128" if spec.dtype == "int8" else "")
    if integer and norm and quantized is None:
        raise EdgecError(f"input '{name}' is {spec.dtype} and the model gives no scale and zero point for it: images "
                         f"go in as {as_is}, and {norm[0]}= does not apply", f"drop {', '.join(norm)} from --preprocess")
    if integer and not norm and quantized is not None and not _pixels_fit(quantized, spec.dtype):
        s, z = quantized
        lo, hi = (s * (float(q) - z) for q in _as_is(np.array([0, 255]), spec.dtype))
        raise EdgecError(f"input '{name}' is {spec.dtype} with scale {s:.6g}, zero point {z}: {as_is} would stand "
                         f"for {lo:.4g}..{hi:.4g}, not 0..1, -1..1 or 0..255",
                         "declare the model's float normalization (scale, mean, std) in --preprocess; edgec "
                         "quantizes it with the input's scale and zero point")
    if not integer and not norm:
        raise EdgecError(f"images for the {spec.dtype} input '{name}' need a declared normalization",
                         "add scale=1/255 (pixels 0..255 to 0..1), or mean=M,M,M,std=S,S,S on that 0..1 scale, "
                         "or scale=1,mean=... on 0..255, to --preprocess")
    if norm:
        scale = 1 / 255 if d.scale is None else d.scale
        mean, std = d.mean or (0.0,), d.std or (1.0,)
        for key, given in (("mean", mean), ("std", std)):
            if len(given) not in (1, channels):
                raise EdgecError(f"--preprocess {key} has {len(given)} values and input '{name}' takes {channels} "
                                 "channel(s)", f"give one {key} or one per channel, in the input's channel order")
    else:
        scale = mean = std = None
    crop = d.crop or (size if d.resize is not None and len(d.resize) == 1 else None)
    final = crop or (d.resize if d.resize is not None and len(d.resize) == 2 else None)
    if final is not None and tuple(final) != size:
        key = "crop" if crop else "resize"
        raise EdgecError(f"--preprocess {key}={_size_text(final)} and input '{name}' {_dims(shape)} takes "
                         f"{size[0]}x{size[1]}", f"make {key} {size[0]}x{size[1]}")
    return ImageInput(spec, size, channels_first, channels == 1, d.channels == "BGR", d.resize, crop, scale,
                      mean, std, quantized)


def check_header(path: Path, image: ImageInput, name: str) -> None:
    """Open `path` as Pillow does (header only, nothing decoded) and check what the image will become."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except Exception as e:   # Pillow raises UnidentifiedImageError, OSError, DecompressionBombError, SyntaxError...
        raise EdgecError(f"cannot read image '{name}' ({_shown(str(e)) or type(e).__name__})",
                         "replace or remove it (PNG, JPEG, BMP, PPM, TIFF, WebP are read)") from None
    if mode not in _MODES:
        raise EdgecError(f"image '{name}' has {mode} pixels, not 8-bit", "save it as an 8-bit PNG or JPEG")
    image.check(name, width, height)


def read(path: Path, image: ImageInput, name: str) -> np.ndarray:
    """The input array for the image file at `path`, decoded now."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im.load()
            return image.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise EdgecError(f"cannot decode image '{name}' ({_shown(str(e)) or type(e).__name__})",
                         "replace or remove it") from None
