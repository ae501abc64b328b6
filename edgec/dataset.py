"""DATA: sample sets for `edgec eval` (and the calibration of quantization), checked against a model's signature.

DATA is an `.npz` holding one array per model input, keyed by the input's name, whose first axis indexes samples,
or a folder of such `.npz` files (a `.npy` file holds the one input of a single-input model). For an input of
shape S, an array of shape [N, *S] holds N samples; when S starts with a batch dimension of 1, [N, *S[1:]] does
too (an input [1,64] takes [N,64] or [N,1,64]); an array of exactly S is one sample. An optional integer array
`labels` (or `y`) gives one label per sample along its first axis.

Every file is checked from its array headers when the set is opened (nothing loaded), so a wrong key, shape or
dtype is refused before anything runs; samples are then read one file at a time (`.npy` files memory-mapped).
Arrays go to the model as they are.

DATA may also be a folder of images for a model with one image input, with a declared preprocessing
(edgec/images.py): unlabelled images, or class folders (torchvision's ImageFolder: the sorted folder names are
the labels 0, 1, ...). Each image is one part of the set: its header is checked at open, its pixels decoded when
its sample is read.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import EdgecError
from .signature import TensorSpec

if TYPE_CHECKING:
    from .images import ImageInput, Preprocess

LABEL_KEYS = ("labels", "y")
_SUFFIXES = (".npz", ".npy")
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_SAVE_HINT = "save one array per model input with numpy.savez(path, NAME=array, ..., labels=labels)"


def _shown(text: str) -> str:
    """A name from a file, printable on one line."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _dims(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Sample:
    index: int                       # position in the data set
    inputs: dict[str, np.ndarray]    # one array per model input, of the input's exact shape and dtype
    label: np.ndarray | None         # the sample's integer label(s): 0-d, or one per row of a class-score output


@dataclass(frozen=True)
class _Part:
    """One file's samples [start, stop)."""
    file: Path
    inputs: tuple[tuple[str, str], ...]         # (input name, its layout: stacked | batch | single); a .npz's key
                                                # is the input's name
    label_key: str | None
    headers: tuple[tuple[str, tuple[int, ...], str], ...]   # (key, shape, dtype) as checked at open
    start: int
    stop: int
    image: tuple["ImageInput", int | None] | None = None   # an image file: how it becomes the input, its label


def _read_header(f, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        read = _HEADERS.get(np.lib.format.read_magic(f))
        if read is None:
            raise ValueError("unsupported .npy version")
        shape, _, dtype = read(f)
    except Exception:  # numpy's header parser raises whatever tokenize and ast raise on malformed bytes
        raise EdgecError(f"{where} is not a .npy array numpy can read", _SAVE_HINT) from None
    if dtype.hasobject or dtype.fields is not None:
        raise EdgecError(f"{where} holds {dtype}, not plain numbers", "save numeric arrays")
    return tuple(int(d) for d in shape), dtype


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of every array in a .npz (keys as numpy.savez wrote them) or a .npy (key "")."""
    name = _shown(str(path))
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                return {"": _read_header(f, name)}
        with zipfile.ZipFile(path) as zf:
            out = {}
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    raise EdgecError(f"{name} holds '{_shown(member)}', which is not an array numpy.savez wrote",
                                     _SAVE_HINT)
                with zf.open(member) as f:
                    out[member[:-4]] = _read_header(f, f"array '{_shown(member[:-4])}' in {name}")
            return out
    except zipfile.BadZipFile:
        raise EdgecError(f"{name} is not a .npz file", _SAVE_HINT) from None
    except OSError as e:
        raise EdgecError(f"cannot read {name} ({e.strerror or e})", "check the path") from None


def _layout(spec: TensorSpec, shape: tuple[int, ...], where: str) -> tuple[str, int]:
    """How an array of `shape` holds samples of `spec`: (layout, number of samples)."""
    s = spec.shape
    if len(shape) == len(s) + 1 and shape[1:] == s:
        return "stacked", shape[0]
    if len(s) >= 1 and s[0] == 1 and shape[1:] == s[1:] and len(shape) == len(s):
        return "batch", shape[0]
    if shape == s:
        return "single", 1
    forms = [_dims(("N",) + s)]
    if len(s) >= 1 and s[0] == 1:
        forms.insert(0, _dims(("N",) + s[1:]))
    raise EdgecError(f"input '{_shown(spec.name)}' in {where} has shape {_dims(shape)}; the model's input is "
                     f"{_dims(s)}",
                     f"save it as an array of shape {' or '.join(forms)} (N samples, first axis)")


def _part(path: Path, specs: tuple[TensorSpec, ...]) -> _Part:
    name = _shown(str(path))
    headers = _headers(path)
    input_names = [s.name for s in specs]
    if "" in headers:   # a .npy: the one input's array
        if len(specs) != 1:
            raise EdgecError(f"{name} holds one array and the model takes {len(specs)} inputs "
                             f"({_shown(', '.join(input_names))})", "use .npz files keyed by input name")
        headers = {specs[0].name: headers[""]}
    label_keys = [k for k in headers if k in LABEL_KEYS and k not in input_names]
    unknown = [k for k in headers if k not in input_names and k not in label_keys]
    if unknown:
        raise EdgecError(f"{name} holds '{_shown(unknown[0])}', which is neither an input of the model "
                         f"({_shown(', '.join(input_names))}) nor labels/y",
                         "key each array by the model's input name (edgec inspect MODEL lists them)")
    missing = [n for n in input_names if n not in headers]
    if missing:
        raise EdgecError(f"{name} has no array for input '{_shown(missing[0])}' (it holds "
                         f"{_shown(', '.join(headers)) or 'nothing'})", _SAVE_HINT)
    if len(label_keys) > 1:
        raise EdgecError(f"{name} holds both 'labels' and 'y'", "keep one array of labels")
    counts, layouts = {}, []
    for spec in specs:
        shape, dtype = headers[spec.name]
        if str(dtype) != spec.dtype:
            raise EdgecError(f"input '{_shown(spec.name)}' in {name} is {dtype}; the model's input is {spec.dtype}",
                             f"convert it with array.astype('{spec.dtype}') before saving")
        layout, counts[spec.name] = _layout(spec, shape, name)
        layouts.append((spec.name, layout))
    if len(set(counts.values())) > 1:
        raise EdgecError(f"the inputs in {name} hold different numbers of samples "
                         f"({_shown(', '.join(f'{k}: {n}' for k, n in counts.items()))})",
                         "give every input the same number of samples along the first axis")
    count = next(iter(counts.values()))
    label_key = label_keys[0] if label_keys else None
    if label_key is not None:
        shape, dtype = headers[label_key]
        if not np.issubdtype(dtype, np.integer):
            raise EdgecError(f"'{label_key}' in {name} is {dtype}, not integer class indices",
                             f"save them with {label_key}.astype('int64')")
        if not shape or shape[0] != count:
            raise EdgecError(f"'{label_key}' in {name} has shape {_dims(shape)} for {count} samples",
                             f"save one label per sample: an array of shape [{count}]")
    return _Part(path, tuple(layouts), label_key,
                 tuple((k, shape, str(dtype)) for k, (shape, dtype) in headers.items()), 0, count)


class Dataset:
    """Samples for a model's signature, read lazily, one file at a time."""

    def __init__(self, source: Path, specs: tuple[TensorSpec, ...], parts: tuple[_Part, ...],
                 description: str | None = None):
        self.source, self.specs, self._parts = source, specs, parts
        self.description = description   # how an image folder becomes inputs and labels; None for arrays

    def __len__(self) -> int:
        return sum(p.stop - p.start for p in self._parts)

    @property
    def labelled(self) -> bool:
        return self._parts[0].label_key is not None

    def samples(self) -> Iterator[Sample]:
        index = 0
        for part in self._parts:
            arrays = _load(part)
            for i in range(part.start, part.stop):
                # a C-ordered copy: out of a memory-mapped file, and 0-d stays 0-d (ascontiguousarray makes it 1-d)
                inputs = {name: np.array(_pick(arrays[name], layout, i), order="C") for name, layout in part.inputs}
                label = np.asarray(arrays[part.label_key][i]) if part.label_key else None
                yield Sample(index, inputs, label)
                index += 1

    def batches(self, size: int) -> Iterator[list[Sample]]:
        """The samples in lists of up to `size`, each call of the model one sample."""
        batch = []
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def split(self, held_back: int) -> tuple["Dataset", "Dataset"]:
        """(the first len - held_back samples, the last held_back): e.g. calibration and its held-back check."""
        if not 0 < held_back < len(self):
            raise EdgecError(f"cannot hold back {held_back} of {len(self)} samples",
                             "hold back at least one sample and keep at least one")
        return self._slice(0, len(self) - held_back), self._slice(len(self) - held_back, len(self))

    def _slice(self, start: int, stop: int) -> "Dataset":
        parts, offset = [], 0
        for p in self._parts:
            n = p.stop - p.start
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                parts.append(replace(p, start=p.start + lo, stop=p.start + hi))
            offset += n
        return Dataset(self.source, self.specs, tuple(parts), self.description)


def _pick(array: np.ndarray, layout: str, i: int) -> np.ndarray:
    """Sample i of an array holding samples in `layout` (see _layout)."""
    if layout == "stacked":
        return array[i]
    return array[i:i + 1] if layout == "batch" else array


def _load(part: _Part) -> dict[str, np.ndarray]:
    """The part's arrays by input name (and label key), checked against the headers read at open."""
    name = _shown(str(part.file))
    if part.image is not None:
        from .images import read

        reader, label = part.image
        arrays = {part.inputs[0][0]: read(part.file, reader, name)}
        return arrays if label is None else {**arrays, part.label_key: np.array([label])}
    keys = [n for n, _ in part.inputs] + ([part.label_key] if part.label_key else [])
    try:
        if part.file.suffix.lower() == ".npy":
            arrays = {part.inputs[0][0]: np.load(part.file, mmap_mode="r", allow_pickle=False)}
            expected = {part.inputs[0][0]: part.headers[0][1:]}
        else:
            with zipfile.ZipFile(part.file) as zf:
                arrays = {}
                for key in keys:
                    with zf.open(key + ".npy") as f:
                        arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
            expected = {k: (shape, dtype) for k, shape, dtype in part.headers if k in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise EdgecError(f"cannot read {name} ({_shown(str(e))})", "was it changed while edgec read it?") from None
    for n, (shape, dtype) in expected.items():
        if arrays[n].shape != tuple(shape) or str(arrays[n].dtype) != dtype:
            raise EdgecError(f"{name} changed while edgec read it", "run again once it is written")
    return arrays


def _listing(folder: Path) -> list[Path]:
    """A data folder's entries, sorted; hidden ones (.DS_Store, ._x.png, .ipynb_checkpoints) are a file
    manager's or a notebook's, not samples."""
    return sorted(f for f in folder.iterdir() if not f.name.startswith("."))


def _refuse_strays(files: list[Path], suffixes: tuple[str, ...], shown: str, kind: str, kept: str) -> None:
    """Refuse the first of `files` that is a folder or has none of `suffixes`: '<shown> holds 'x', which is not
    <kind>', hint 'keep only the <kept> in it'."""
    stray = next((f for f in files if f.suffix.lower() not in suffixes or not f.is_file()), None)
    if stray is not None:
        raise EdgecError(f"{shown} holds '{_shown(stray.name)}', which is not {kind}", f"keep only the {kept} in it")


def _images_in(folder: Path, shown: str) -> list[Path]:
    from .images import SUFFIXES

    files = _listing(folder)
    _refuse_strays(files, SUFFIXES, shown, f"an image file ({', '.join(SUFFIXES)})", "images")
    if not files:
        raise EdgecError(f"{shown} holds no images", "put the images in it, or remove it")
    return files


def _image_dataset(folder: Path, entries: list[Path], specs: tuple[TensorSpec, ...],
                   preprocess: "Preprocess | str | None", quantization: dict | None) -> Dataset:
    """A folder of images, or of class folders of images (labels: the sorted folder names), as samples of the
    model's one input; every image's header is checked now."""
    from . import images

    name = _shown(str(folder))
    declared = images.parse_preprocess(preprocess) if isinstance(preprocess, str) else preprocess
    reader = images.resolve(declared, specs, quantization)
    classes = [e for e in entries if e.is_dir()]
    if classes and len(classes) != len(entries):
        stray = next(e for e in entries if not e.is_dir())
        raise EdgecError(f"image folder {name} holds class folders and the file '{_shown(stray.name)}'",
                         "put every image in a class folder (labels: the sorted folder names), or use none")
    files = ([(f, label) for label, c in enumerate(classes) for f in _images_in(c, f"class folder '{_shown(c.name)}'")]
             if classes else [(f, None) for f in _images_in(folder, f"image folder {name}")])
    # the label's key in a part's arrays: not the input's name
    label_key = next(k for k in LABEL_KEYS if k != specs[0].name) if classes else None
    parts = []
    for f, label in files:
        images.check_header(f, reader, _shown(str(f.relative_to(folder))))
        parts.append(_Part(f, ((specs[0].name, "single"),), label_key, (), 0, 1, (reader, label)))
    labels = (f"labels from {len(classes)} class folders, sorted: 0 = '{_shown(classes[0].name)}'"
              + (f" ... {len(classes) - 1} = '{_shown(classes[-1].name)}'" if len(classes) > 1 else "")
              if classes else "no labels (no class folders)")
    return Dataset(folder, specs, tuple(parts), f"images read as {reader.describe()}; {labels}")


def open_dataset(path: str | Path, specs: tuple[TensorSpec, ...] | list[TensorSpec],
                 preprocess: "Preprocess | str | None" = None,
                 quantization: dict[str, tuple[float, int]] | None = None) -> Dataset:
    """The samples in DATA (a .npz, a .npy, or a folder of them, sorted by name) for a model taking `specs`.
    Every file's keys, shapes and dtypes are checked now; EdgecError names the first mismatch and its fix.
    A folder of images (or of class folders of images) takes `preprocess` (edgec.images: a Preprocess, or the
    text of --preprocess), completed from the model's input and its integer inputs' (scale, zero point) by name
    in `quantization` (frontends.tflite.input_quantization)."""
    from .images import SUFFIXES as IMAGE_SUFFIXES

    path, specs = Path(path), tuple(specs)
    name = _shown(str(path))
    if path.is_dir():
        files = _listing(path)
        if any(f.is_dir() or f.suffix.lower() in IMAGE_SUFFIXES for f in files):
            return _image_dataset(path, files, specs, preprocess, quantization)
        _refuse_strays(files, _SUFFIXES, f"data folder {name}", "a .npz, .npy or image file", "sample files")
        if not files:
            raise EdgecError(f"data folder {name} is empty",
                             "put .npz files keyed by input name, or images, in it")
    elif path.is_file():
        if path.suffix.lower() not in _SUFFIXES:
            raise EdgecError(f"data file {name} is not a .npz or .npy file",
                             f"{_SAVE_HINT}, or pass a folder of images")
        files = [path]
    else:
        raise EdgecError(f"data {name} does not exist", "pass a .npz file or a folder of them")
    if preprocess is not None:
        raise EdgecError(f"--preprocess is for a folder of images and {name} holds arrays",
                         "drop --preprocess: arrays go to the model as they are")
    parts = tuple(_part(f, specs) for f in files)
    labelled = [p.label_key is not None for p in parts]
    if any(labelled) and not all(labelled):
        without = parts[labelled.index(False)].file.name
        raise EdgecError(f"some files in {name} have labels and '{_shown(without)}' has none",
                         "give every file labels, or none")
    dataset = Dataset(path, specs, parts)
    if len(dataset) == 0:
        raise EdgecError(f"data {name} holds no samples", "save at least one sample per input")
    return dataset
