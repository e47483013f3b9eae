"""The Hugging Face checkpoint layout: ``model.safetensors``, or shards plus ``model.safetensors.index.json``."""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The dtype names of the safetensors format (its header's "dtype" field).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what it is, from the file header alone.

    Attributes:
        file: The file name, relative to the checkpoint folder.
        shape: The tensor's shape.
        dtype: The tensor's dtype.
    """

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """The tensor's size in the file."""
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())

    def meta(self) -> torch.Tensor:
        """An empty ``meta`` tensor of this shape and dtype (for dry-running mappers)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def shard_file_name(index: int, count: int) -> str:
    """The Hugging Face name of shard ``index`` (0-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def read_layout(src_dir: str | Path) -> dict[str, TensorInfo]:
    """Reads every file header of a checkpoint folder (no tensor data) and checks that they agree with the index.

    Raises:
        FileNotFoundError: If the folder has neither layout, or the index names a file that does not exist (the
            message names the file and one key mapped to it).
        ValueError: If the index is malformed or names a file outside the folder (see :func:`read_weight_map`),
            a file is unreadable or truncated (the message names the file and safetensors' reason), a
            file lacks a tensor the index maps to it, a file holds a tensor the index does not list, or two files
            hold the same key.
    """
    src = Path(src_dir)
    index_path = src / INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] | None = read_weight_map(src)
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (src / file).is_file():
                key = next(k for k, f in weight_map.items() if f == file)
                raise FileNotFoundError(f"{index_path} maps {key!r} to {file}, which does not exist in {src}")
    elif (src / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{src} holds neither {SINGLE_FILE} nor {INDEX_FILE}")

    layout: dict[str, TensorInfo] = {}
    for file in files:
        for key, (shape, dtype) in read_header(src / file).items():
            if key in layout:
                raise ValueError(f"key {key!r} is in both {layout[key].file} and {file} under {src}")
            if weight_map is not None and weight_map.get(key) != file:
                raise ValueError(f"{src / file} holds {key!r}, which {INDEX_FILE} does not map to it")
            layout[key] = TensorInfo(file=file, shape=shape, dtype=dtype)
    if weight_map is not None:
        for key, file in weight_map.items():
            if key not in layout:
                raise ValueError(f"{index_path} maps {key!r} to {file}, but that file has no such tensor")
    return layout


def read_weight_map(src: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked: a JSON object of string keys to file names inside ``src``.

    A file name that is absolute, climbs out with ``..``, or resolves outside ``src`` through a symlink is
    refused, so a crafted index cannot make every rank read an arbitrary file.

    Raises:
        ValueError: If the index is not JSON, has no ``weight_map`` object, maps a key to something other than a
            string, or maps a key to a file outside ``src``; the message names the index and the key.
    """
    index_path = src / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_path} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no 'weight_map' object (got {type(weight_map).__name__})")
    root = src.resolve()
    for key, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise ValueError(f"{index_path} maps {key!r} to {file!r}, not a file name")
        if Path(file).is_absolute() or not (src / file).resolve().is_relative_to(root):
            raise ValueError(f"{index_path} maps {key!r} to {file!r}, which resolves to {(src / file).resolve()}, "
                             f"outside the checkpoint folder {root}")
    return weight_map


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of a ``.safetensors`` file's tensors, read from its header.

    Raises:
        ValueError: If safetensors cannot read the file (truncated, corrupt) or it uses an unknown dtype; the
            message names the file.
    """
    try:
        with safe_open(path, framework="pt") as f:
            header = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor_slice = f.get_slice(key)
                dtype_name = tensor_slice.get_dtype()
                if dtype_name not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {dtype_name}")
                header[key] = (tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype_name])
            return header
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e
