"""Open Inference Protocol v2 (KServe v2 / Triton) JSON tensors."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medserve.errors import BadRequestError

# OIP datatype -> numpy dtype for the types medserve engines accept.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_DATATYPE = {value: key for key, value in DATATYPES.items()}

# A tensor beyond this many elements is refused before numpy allocates it.
MAX_ELEMENTS = 64 * 1024 * 1024


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="Tensor name.")
    # Each dimension bounded in the type (the published schema states it); the product is checked below,
    # in Python integers: numpy's int64 product overflows, or wraps silently, on fuzzed shapes.
    shape: list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]] = Field(
        min_length=1, max_length=8, description="Tensor shape."
    )
    datatype: Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"] = Field(
        description="Element type."
    )
    data: list[Any] = Field(description="Elements, flat in row-major order (nested lists are flattened).")
    parameters: dict[str, Any] | None = Field(default=None, description="Per-tensor parameters.")

    @model_validator(mode="after")
    def _shape_is_sane(self) -> "InferTensor":
        if math.prod(self.shape) > MAX_ELEMENTS:
            raise ValueError("tensor is too large")
        return self

    def to_numpy(self) -> np.ndarray:
        try:
            flat = np.asarray(self.data, dtype=DATATYPES[self.datatype]).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise BadRequestError("tensor data does not match its datatype", tensor=self.name) from None
        expected = math.prod(self.shape)
        if flat.size != expected:
            raise BadRequestError(
                "tensor data has the wrong number of elements for its shape",
                tensor=self.name,
                expected=expected,
                got=int(flat.size),
            )
        return flat.reshape(self.shape)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=128, description="Caller's request id, echoed back.")
    inputs: list[InferTensor] = Field(min_length=1, max_length=16, description="Input tensors.")
    outputs: list[dict[str, Any]] | None = Field(default=None, description="Requested outputs (all if absent).")
    parameters: dict[str, Any] | None = Field(default=None, description="Request parameters.")


def tensor_from_numpy(name: str, array: np.ndarray) -> dict[str, Any]:
    datatype = NUMPY_TO_DATATYPE.get(str(array.dtype))
    if datatype is None:
        array = array.astype(np.float32)
        datatype = "FP32"
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}
