"""QuantizedTensor and QuantFormat: what quantized numbers mean (the format), independent of how
a kernel lays the bytes out."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from . import _interop

GroupSize = Union[int, None, str]  # int: elements per group; None: one group per row; "tensor"

SCHEMES = {"asymmetric": 0, "symmetric": 1, "nf4": 2}
_DICT_VERSION = 1
_VALID_ATTR = "_lowbit_validated"  # what validate() last accepted (see there)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class QuantFormat:
    """bits: 2, 3, 4 or 8. symmetric: codes are signed and the zero point is 0.
    group_size: elements per group along K (the last group of a row may be shorter), None for one
    group per row (per-channel / per-token), or "tensor" for one scale for the whole tensor.
    codebook: None for a uniform grid, or "nf4" (4-bit NormalFloat, absmax-scaled)."""

    bits: int
    symmetric: bool
    group_size: GroupSize
    codebook: Optional[str] = None

    def __post_init__(self):
        if not _is_int(self.bits) or self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits!r}")
        object.__setattr__(self, "bits", int(self.bits))
        g = self.group_size
        if not (g is None or (isinstance(g, str) and g == "tensor") or (_is_int(g) and g > 0)):
            raise ValueError(f'group_size must be a positive int, None (per row) or "tensor", got {g!r}')
        if _is_int(g):
            object.__setattr__(self, "group_size", int(g))
        if self.codebook not in (None, "nf4"):
            raise ValueError(f'codebook must be None or "nf4", got {self.codebook!r}')
        if self.codebook == "nf4" and self.bits != 4:
            raise ValueError(f"the nf4 codebook needs bits=4, got {self.bits}")

    @property
    def scheme(self) -> str:
        if self.codebook == "nf4":
            return "nf4"
        return "symmetric" if self.symmetric else "asymmetric"

    @property
    def name(self) -> str:
        kind = "nf4" if self.codebook else f"int{self.bits}-{'sym' if self.symmetric else 'asym'}"
        g = self.group_size
        return f"{kind}-{'per_row' if g is None else 'per_tensor' if g == 'tensor' else f'g{g}'}"

    def kernel_group_size(self, K: int) -> int:
        """The group length the kernels use: a whole row for per-row and per-tensor formats."""
        return K if self.group_size in (None, "tensor") else int(self.group_size)

    def num_groups(self, K: int) -> int:
        g = self.kernel_group_size(K)
        return (K + g - 1) // g


def _array_meta(codes, scales, zeros) -> tuple:
    """The shapes and dtypes validate() remembers with the array objects (a numpy array's shape
    can be reassigned in place)."""
    return (codes.shape, codes.dtype, scales.shape, scales.dtype,
            None if zeros is None else (zeros.shape, zeros.dtype))


@dataclass
class QuantizedTensor:
    """A quantized [rows, K] matrix, grouped along K.

    codes  : bits == 8: int8 (symmetric) or uint8 (asymmetric) [rows, K];
             bits <= 4: uint8 [rows, ceil(K/2)], two codes per byte — element 2j in the low nibble
             of byte j; symmetric codes as 4-bit two's complement.
    scales : float32 [rows, groups] ([1, 1] for per-tensor).
    zeros  : uint8 [rows, groups] integer zero points (asymmetric only), else None.
    Meaning: w ≈ (q - zero) * scale, or q * scale (symmetric), or nf4[q] * scale.
    All arrays live in the framework and on the device of the tensor that was quantized.
    What is derived from the fields (the validation memo, the kernels' packed layouts) is cached
    on the object and dropped when a field is assigned; an array edited *in place* after the
    first matmul is not seen (assign a new array instead).
    """

    codes: Any
    scales: Any
    zeros: Optional[Any]
    shape: Tuple[int, int]
    format: QuantFormat

    def __setattr__(self, name, value):
        if name in FIELD_NAMES:
            for k in [k for k in self.__dict__ if k not in FIELD_NAMES]:
                del self.__dict__[k]
        object.__setattr__(self, name, value)

    def __getstate__(self):
        # pickle and copy take the fields only: the caches (a CPU weight's packed layout in a
        # mapping of its own, GPU buffers) are rebuilt on first use
        return {k: v for k, v in self.__dict__.items() if k in FIELD_NAMES}

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> GroupSize:
        return self.format.group_size

    @property
    def symmetric(self) -> bool:
        return self.format.symmetric

    @property
    def device(self) -> str:
        return _interop.describe_device(_interop.device_of(self.codes))

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scales + zeros."""
        total = 0
        for a in (self.codes, self.scales, self.zeros):
            if a is not None:
                total += int(np.prod(a.shape)) * (1 if _interop.dtype_name(a) in ("uint8", "int8") else 4)
        return total

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict of arrays (for saving); `from_dict` inverts it exactly."""
        g = self.format.group_size
        meta = np.array([_DICT_VERSION, self.bits, SCHEMES[self.format.scheme],
                         -1 if g is None else 0 if g == "tensor" else int(g), *self.shape], dtype=np.int64)
        d = {"codes": self.codes, "scales": self.scales, "meta": meta}
        if self.zeros is not None:
            d["zeros"] = self.zeros
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QuantizedTensor":
        meta = [int(v) for v in _interop.to_numpy(d["meta"]).reshape(-1)]
        if len(meta) != 6:
            raise ValueError("meta must hold 6 integers (version, bits, scheme, group_size, rows, K)")
        version, bits, scheme, g, rows, K = meta
        if version > _DICT_VERSION:
            raise ValueError(f"QuantizedTensor dict version {version} is newer than this lowbit "
                             f"understands ({_DICT_VERSION}); upgrade lowbit")
        names = {v: k for k, v in SCHEMES.items()}
        if scheme not in names:
            raise ValueError(f"unknown scheme code {scheme}")
        fmt = QuantFormat(bits=bits, symmetric=names[scheme] != "asymmetric",
                          group_size=None if g == -1 else "tensor" if g == 0 else g,
                          codebook="nf4" if names[scheme] == "nf4" else None)
        qt = cls(d["codes"], d["scales"], d.get("zeros"), (rows, K), fmt)
        qt.validate()
        return qt

    def validate(self) -> None:
        """Check that the arrays agree with the format and shape (ValueError/TypeError if not).
        A passed check is remembered for these array objects (with their shapes and dtypes), shape
        and format, so validating an unchanged tensor again (every matmul) costs about a µs."""
        seen = self.__dict__.get(_VALID_ATTR)
        c, s, z = self.codes, self.scales, self.zeros
        # unrolled, no generator: this runs on every matmul (0.4 µs against 1.3)
        if (seen is not None and seen[0] is self.format and seen[1] == self.shape and seen[2] is c
                and seen[3] is s and seen[4] is z and seen[5] == _array_meta(c, s, z)):
            return
        self._validate_arrays()
        self._trust()

    def _trust(self) -> None:
        """Remember the current arrays as validated. Also for callers that validated the very
        same buffers before (torch_ops' packing cache) and must not keep the arrays alive."""
        c, s, z = self.codes, self.scales, self.zeros
        self.__dict__[_VALID_ATTR] = (self.format, tuple(self.shape), c, s, z, _array_meta(c, s, z))

    def _validate_arrays(self) -> None:
        if not isinstance(self.format, QuantFormat):
            raise TypeError(f"format must be a QuantFormat, got {type(self.format).__name__}")
        if len(self.shape) != 2 or not all(_is_int(d) and d > 0 for d in self.shape):
            raise ValueError(f"shape must be two positive ints [rows, K], got {self.shape!r}")
        rows, K = self.shape
        f = self.format
        want_codes = (rows, K if f.bits == 8 else (K + 1) // 2)
        code_dtype = "int8" if (f.bits == 8 and f.symmetric and not f.codebook) else "uint8"
        groups = (1, 1) if f.group_size == "tensor" else (rows, f.num_groups(K))
        checks = [("codes", self.codes, want_codes, code_dtype), ("scales", self.scales, groups, "float32")]
        if f.scheme == "asymmetric":
            if self.zeros is None:
                raise ValueError("an asymmetric QuantizedTensor needs zeros")
            checks.append(("zeros", self.zeros, groups, "uint8"))
        elif self.zeros is not None:
            raise ValueError(f"a {f.scheme} QuantizedTensor has no zeros")
        devices = set()
        for name, a, shape, dtype in checks:
            if not _interop._is_framework_array(a):
                raise TypeError(f"{name} must be a numpy array, torch tensor or CuPy array, "
                                f"got {type(a).__name__}")
            if tuple(a.shape) != tuple(shape):
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
            if _interop.dtype_name(a) != dtype:
                raise TypeError(f"{name} must be {dtype}, got {_interop.dtype_name(a)}")
            devices.add(_interop.device_of(a))
        if len(devices) > 1:
            raise ValueError("codes, scales and zeros must be on one device")
        if devices == {("cpu", -1)}:
            self._validate_values()

    def _validate_values(self) -> None:
        """What the arrays hold (CPU arrays; a CUDA check would synchronize): finite scales, zero
        points and sub-4-bit codes inside the format's range. Negative scales are allowed (ggml's
        Q4_0 quantizer makes some)."""
        f = self.format
        if not np.isfinite(_interop.to_numpy(self.scales)).all():
            raise ValueError("scales must be finite (found NaN or Inf)")
        top = (1 << f.bits) - 1
        if self.zeros is not None and f.bits < 8 and int(_interop.to_numpy(self.zeros).max()) > top:
            raise ValueError(f"zeros must be in [0, {top}] for {f.bits}-bit codes")
        if f.bits < 4:
            c = _interop.to_numpy(self.codes)
            nibbles = np.stack([c & 15, c >> 4], axis=-1).reshape(c.shape[0], -1)[:, :self.shape[1]]
            if f.symmetric:   # two's complement in 4 bits: [-2^(b-1), 2^(b-1) - 1]
                half = 1 << (f.bits - 1)
                bad = (nibbles >= half) & (nibbles < 16 - half)
            else:
                bad = nibbles > top
            if bad.any():
                raise ValueError(f"codes hold values outside the {f.bits}-bit {f.scheme} range")

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={self.shape}, format={self.format.name}, "
                f"device={self.device}, nbytes={self.nbytes})")


FIELD_NAMES = frozenset(f.name for f in fields(QuantizedTensor))
