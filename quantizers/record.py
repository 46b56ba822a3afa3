"""The quantized-tensor record: what every quantizer produces and every writer maps onto its encoding.

A record holds one linear weight ``W [out, in]`` as integer codes plus the numbers that turn
them back into floats, with the conventions of compressed-tensors (ref: compressed-tensors
0.20.0 quantization/lifecycle/forward_helpers.py ``_dequantize``, quantization/utils/helpers.py
``calculate_range``):

- codes are signed, in ``[-2**(bits-1), 2**(bits-1) - 1]`` for both symmetric and asymmetric
  schemes, stored one per int8 (int4 unpacked);
- scales and zero points have one column per group of ``group_size`` input columns, or a
  single column when the scale is per output channel (``group_size`` None);
- ``W ~= (codes - zero_point) * scale``, the zero point absent (0) when symmetric.

Nothing here packs bits: packing is each writer's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gemport.errors import CheckpointError

if TYPE_CHECKING:
    import torch

BITS = (4, 8)
SCALE_DTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class QuantFormat:
    """How a tensor is quantized, known without loading it (bits, grouping, symmetry, scale dtype)."""

    bits: int
    group_size: int | None  # None: one scale per output channel
    symmetric: bool
    scale_dtype: str

    def describe(self) -> str:
        """e.g. 'int4 g128 asym (bf16 scales)' or 'int8 per-channel sym (f32 scales)'."""
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'} ({self.scale_dtype} scales)"

    def groups(self, columns: int) -> int:
        """Scale columns for a row of ``columns`` inputs."""
        return 1 if self.group_size is None else columns // self.group_size

    def code_range(self) -> tuple[int, int]:
        """Signed integer range of the codes (ref: compressed-tensors ``_calculate_range`` for INT)."""
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized linear weight: int8 ``codes [out, in]``, ``scales [out, groups]`` in the
    scale dtype, int8 ``zero_points [out, groups]`` or None when symmetric."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    format: QuantFormat

    def __post_init__(self) -> None:
        import torch

        from gemport.checkpoint import dtype_name

        f = self.format
        if self.codes.dtype != torch.int8 or self.codes.ndim != 2:
            raise CheckpointError(f"codes must be a 2-D int8 tensor, got {self.codes.ndim}-D {self.codes.dtype}")
        rows, cols = self.codes.shape
        if f.group_size is not None and cols % f.group_size:
            raise CheckpointError(f"{cols} columns do not split into groups of {f.group_size}")
        want = (rows, f.groups(cols))
        if tuple(self.scales.shape) != want or dtype_name(self.scales.dtype) != f.scale_dtype:
            raise CheckpointError(
                f"scales are {list(self.scales.shape)} {self.scales.dtype}, expected {list(want)} {f.scale_dtype}"
            )
        if f.symmetric != (self.zero_points is None):
            raise CheckpointError("zero points are required exactly when the scheme is asymmetric")
        if self.zero_points is not None and (
            tuple(self.zero_points.shape) != want or self.zero_points.dtype != torch.int8
        ):
            raise CheckpointError(f"zero points must be int8 {list(want)}, got {list(self.zero_points.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: str = "f32") -> torch.Tensor:
        """``(codes - zero_point) * scale`` computed in ``dtype``, as compressed-tensors decompresses a
        weight whose scale parameter has that dtype (ref: forward_helpers.py ``_dequantize``; at load,
        transformers creates the scale in the model's dtype, quantization/lifecycle/initialize.py)."""
        from gemport.checkpoint import torch_dtype

        dt = torch_dtype(dtype)
        rows, cols = self.codes.shape
        groups = self.scales.shape[1]
        x = self.codes.to(dt).reshape(rows, groups, cols // groups)
        if self.zero_points is not None:
            x = x - self.zero_points.to(dt).unsqueeze(-1)
        return (x * self.scales.to(dt).unsqueeze(-1)).reshape(rows, cols)
