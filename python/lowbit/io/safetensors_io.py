"""lowbit.save / lowbit.load: dicts of QuantizedTensors and plain arrays as safetensors files.

The schema (docs/format.md) lives in the safetensors header's __metadata__ (strings only):
  "format": "lowbit", "lowbit.schema_version": "1", "lowbit.entries": JSON {name: entry}
  quantized entry: {"kind": "quantized", "layout": "lowbit-rows-v1", "bits", "scheme",
                    "group_size", "shape": [rows, K], "tensors": {"codes", "scales"[, "zeros"]: key},
                    "framework"}
  dense entry:     {"kind": "dense", "tensors": {"data": key}, "dtype", "framework"}
  alias entry:     {"kind": "alias", "of": name}  (schema 2: a dense array sharing memory with an
                   earlier entry, e.g. a tied lm_head; stored once, loaded as the same object)
Files are written by the safetensors package (numpy API, so torch stays optional) and read by the
small parser below, which checks every tensor's extent against the file before touching data, so
a truncated or corrupted file fails with the name of the tensor. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .. import _interop
from ..tensor import SCHEMES, QuantFormat, QuantizedTensor
from . import _common as C

SCHEMA_VERSION = 2   # 2 added alias entries; files without aliases are still written as 1
LAYOUT = "lowbit-rows-v1"  # QuantizedTensor's own arrays: codes [rows, K or ceil(K/2)], scales/zeros [rows, G]
_PARTS = ("codes", "scales", "zeros")
_MAX_HEADER = 100 << 20

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
# what save() may write: exactly the dtypes the reader above accepts (complex, float128, object... are not)
_SAVABLE = {np.dtype(t) for t in _ST_DTYPES.values()}


# ---------------------------------------------------------------------------------------- reading
def read_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str], int]:
    """(tensor infos, __metadata__, offset of the data section), every tensor's dtype, shape and
    byte range checked against each other and against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: truncated or not a safetensors file (header claims {n} bytes, "
                             f"file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: corrupted safetensors header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    # safetensors defines __metadata__ as {string: string}; the readers below rely on that
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupted safetensors header (__metadata__ is a JSON "
                         f"{type(meta).__name__}, not an object of strings)")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ValueError(f"{path}: corrupted safetensors header (__metadata__ {k!r} is a JSON "
                             f"{type(v).__name__}, not a string)")
    start = 8 + n
    for name, info in header.items():
        try:
            dt = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = [C.exact_int(s, "shape") for s in info["shape"]]
            b, e = (C.exact_int(v, "data_offsets") for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: unsupported dtype or malformed entry {info!r}") from None
        want = math.prod(shape) * dt.itemsize  # Python ints: a huge shape cannot wrap to 0
        if e - b != want:
            raise ValueError(f"{path}: tensor {name!r}: {info['dtype']}{shape} needs {want} bytes but its "
                             f"byte range [{b}, {e}) holds {e - b}")
        if start + e > size:
            raise ValueError(f"{path}: truncated file: tensor {name!r} ends at byte {start + e} "
                             f"but the file has {size}")
    return header, meta, start


def _read_tensor(f, path: str, name: str, info: dict, start: int) -> np.ndarray:
    b, e = info["data_offsets"]
    f.seek(start + b)
    buf = f.read(e - b)
    if len(buf) != e - b:
        raise ValueError(f"{path}: truncated file while reading tensor {name!r}")
    a = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<"))
    return a.astype(a.dtype.newbyteorder("="), copy=True).reshape(info["shape"])


def read_raw(path: str, bf16: str = "float32") -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Every tensor of any safetensors file as numpy, plus its __metadata__. BF16 tensors come back
    widened to float32 (bf16="float32", exact) or as their raw uint16 bits (bf16="raw")."""
    header, meta, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            a = _read_tensor(f, path, name, info, start)
            if info["dtype"] == "BF16" and bf16 != "raw":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a
    return out, meta


# ---------------------------------------------------------------------------------------- helpers
def _torch():
    return sys.modules.get("torch")


def _to_host(x: Any, key: str) -> Tuple[np.ndarray, str, str]:
    """(numpy array, dtype name, framework); bfloat16 torch tensors become their uint16 bits."""
    try:
        fw = _interop.framework_of(x)
    except TypeError:
        raise TypeError(f"lowbit.save: {key!r} is a {type(x).__name__}; expected a QuantizedTensor or a "
                        f"numpy array / torch tensor / CuPy array") from None
    dt = _interop.dtype_name(x)
    if fw == "torch":
        import torch

        t = x.detach().cpu().contiguous()
        a = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    else:
        a = _interop.to_numpy(x)
    return np.asarray(a, order="C"), dt, fw  # not ascontiguousarray: it turns 0-d into 1-d


def _to_framework(a: np.ndarray, dtype: str, fw: str):
    if fw == "torch":
        import torch

        if dtype == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a)
    if dtype == "bfloat16":  # numpy has no bfloat16: widen exactly
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _target(requested: Optional[str], saved: str) -> str:
    if requested is not None:
        if requested not in ("numpy", "torch"):
            raise ValueError(f"framework must be None, 'numpy' or 'torch', got {requested!r}")
        if requested == "torch":
            import torch  # noqa: F401  (a clear ImportError when torch is missing)
        return requested
    if saved == "torch":
        try:
            import torch  # noqa: F401
            return "torch"
        except ImportError:
            return "numpy"
    return "numpy"


# ---------------------------------------------------------------------------------------- save
def save(obj: Mapping[str, Any], path: str) -> None:
    """Save {name: QuantizedTensor | array} (a torch state_dict may hold QuantizedTensors) to a
    safetensors file. Written to a temporary file in the same folder and renamed into place."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ImportError("lowbit.save needs the safetensors package: pip install safetensors") from None
    if not isinstance(obj, Mapping):
        raise TypeError(f"lowbit.save expects a dict of name -> QuantizedTensor or array, got {type(obj).__name__}")
    tensors: Dict[str, np.ndarray] = {}
    entries: Dict[str, dict] = {}
    stored: Dict[tuple, str] = {}   # memory identity of each dense array written -> its name

    def put(key: str, a: np.ndarray, owner: str) -> str:
        if key in tensors:
            raise ValueError(f"lowbit.save: the stored name {key!r} of {owner!r} collides with another entry")
        if key == "__metadata__":  # the safetensors header's own key: the file could not be read back
            raise ValueError(f"lowbit.save: {owner!r}: the name '__metadata__' is reserved by safetensors")
        if a.dtype not in _SAVABLE:
            raise TypeError(f"lowbit.save: {owner!r}: dtype {a.dtype.name} cannot be stored (supported: "
                            f"{', '.join(sorted({d.name for d in _SAVABLE}))}, and bfloat16)")
        tensors[key] = a
        return key

    for name, value in obj.items():
        if not isinstance(name, str):
            raise TypeError(f"lowbit.save: keys must be strings, got {name!r}")
        if isinstance(value, QuantizedTensor):
            try:
                value.validate()
            except (TypeError, ValueError) as e:
                raise type(e)(f"lowbit.save: {name!r}: {e}") from None
            f = value.format
            parts, fw = {}, "numpy"
            for p in _PARTS:
                arr = getattr(value, p)
                if arr is None:
                    continue
                a, _, fw = _to_host(arr, name)
                parts[p] = put(f"{name}.lowbit.{p}", a, name)
            entries[name] = {"kind": "quantized", "layout": LAYOUT, "bits": f.bits, "scheme": f.scheme,
                             "group_size": f.group_size, "shape": list(value.shape), "tensors": parts,
                             "framework": fw}
        else:
            same = _memory_identity(value)
            if same is not None and same in stored:
                entries[name] = {"kind": "alias", "of": stored[same]}
                continue
            a, dt, fw = _to_host(value, name)
            entries[name] = {"kind": "dense", "tensors": {"data": put(name, a, name)}, "dtype": dt,
                             "framework": fw}
            if same is not None:
                stored[same] = name
    aliases = any(e["kind"] == "alias" for e in entries.values())
    meta = {"format": "lowbit", "lowbit.schema_version": str(SCHEMA_VERSION if aliases else 1),
            "lowbit.entries": json.dumps(entries)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _memory_identity(x: Any) -> Optional[tuple]:
    """(device, address, shape, strides, dtype) of a torch tensor or numpy array: equal for two
    views of the same memory, such as a tied embedding and lm_head in a state_dict."""
    if getattr(x, "size", None) == 0 or (callable(getattr(x, "numel", None)) and x.numel() == 0):
        return None
    if isinstance(x, np.ndarray):
        return ("numpy", x.__array_interface__["data"][0], x.shape, x.strides, str(x.dtype))
    if type(x).__module__.startswith("torch") and hasattr(x, "data_ptr"):
        return (str(x.device), x.data_ptr(), tuple(x.shape), tuple(x.stride()), str(x.dtype))
    return None


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; when the block succeeds the file is fsynced and
    renamed over `path`, otherwise removed. Readers see the old file or the complete new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------- load
def load(path: str, framework: Optional[str] = None) -> Dict[str, Any]:
    """Load a file written by lowbit.save: {name: QuantizedTensor | array}. framework: None (as
    saved; numpy when torch is missing), "numpy" or "torch". A safetensors file without lowbit
    metadata loads as plain arrays."""
    header, meta, start = read_header(path)
    if meta.get("format") != "lowbit" or "lowbit.entries" not in meta:
        raw, _ = read_raw(path, bf16="raw")
        fw = _target(framework, "numpy")
        return {k: _to_framework(a, "bfloat16" if header[k]["dtype"] == "BF16" else str(a.dtype), fw)
                for k, a in raw.items()}
    try:
        version = int(meta.get("lowbit.schema_version", ""))
    except ValueError:
        raise ValueError(f"{path}: malformed lowbit.schema_version {meta.get('lowbit.schema_version')!r}") from None
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path} uses lowbit file schema version {version}; this lowbit reads up to "
                         f"{SCHEMA_VERSION}. Upgrade lowbit to read it.")
    try:
        entries = json.loads(meta["lowbit.entries"])
    except ValueError as e:
        raise ValueError(f"{path}: corrupted lowbit.entries metadata ({e})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: corrupted lowbit.entries metadata (a JSON {type(entries).__name__}, "
                         f"not an object of name -> entry)")
    out: Dict[str, Any] = {}
    with open(path, "rb") as f:
        for name, ent in entries.items():
            if isinstance(ent, dict) and ent.get("kind") == "alias":
                of = ent.get("of")
                if not isinstance(of, str) or of not in out or isinstance(out[of], QuantizedTensor):
                    raise ValueError(f"{path}: tensor {name!r}: alias of {of!r}, which is not an earlier "
                                     f"dense entry")
                out[name] = out[of]
                continue
            out[name] = _load_entry(f, path, header, start, name, ent, framework)
    return out


def _load_entry(f, path, header, start, name, ent, framework):
    where = f"{path}: tensor {name!r}"
    if not isinstance(ent, dict):
        raise ValueError(f"{where}: malformed entry {ent!r}")
    kind = ent.get("kind")
    keys = ent.get("tensors") or {}
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise ValueError(f"{where}: malformed entry: its tensors must be an object of part -> stored "
                         f"tensor name, got {keys!r}")
    arrays = {}
    for part, key in keys.items():
        if key not in header:
            raise ValueError(f"{where}: its {part} ({key!r}) is missing from the file")
        arrays[part] = _read_tensor(f, path, key, header[key], start)
    fw = _target(framework, ent.get("framework", "numpy"))
    if kind == "dense":
        if "data" not in arrays:
            raise ValueError(f"{where}: dense entry without data")
        dtype, stored = ent.get("dtype"), header[keys["data"]]["dtype"]
        # save() writes bfloat16 as its uint16 bits (numpy has no bfloat16); any other mismatch
        # would reinterpret the bytes as another type
        have = "bfloat16" if stored == "BF16" else arrays["data"].dtype.name
        if dtype != have and not (dtype == "bfloat16" and have == "uint16"):
            raise ValueError(f"{where}: its metadata says dtype {dtype!r} but the file stores it as "
                             f"{stored} ({have})")
        return _to_framework(arrays["data"], dtype, fw)
    if kind != "quantized":
        raise ValueError(f"{where}: unknown entry kind {kind!r} (this lowbit knows 'quantized', 'dense', 'alias')")
    if ent.get("layout") != LAYOUT:
        raise ValueError(f"{where}: unknown layout {ent.get('layout')!r} (this lowbit reads {LAYOUT!r})")
    scheme = ent.get("scheme")
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown format scheme {scheme!r} (known: {sorted(SCHEMES)})")
    try:
        g = ent.get("group_size")
        fmt = QuantFormat(bits=C.exact_int(ent["bits"], "bits", 1), symmetric=scheme != "asymmetric",
                          group_size=g if g in (None, "tensor") else C.exact_int(g, "group_size", 1),
                          codebook="nf4" if scheme == "nf4" else None)
        rows, K = (C.exact_int(v, "shape") for v in ent["shape"])
        for p in ("codes", "scales"):
            if p not in arrays:
                raise ValueError(f"its {p} are missing")
        qt = QuantizedTensor(*(None if arrays.get(p) is None else _to_framework(arrays[p], "", fw)
                               for p in _PARTS), (rows, K), fmt)
        qt.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: inconsistent quantized entry: {e}") from None
    return qt
