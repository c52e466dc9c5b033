"""ONNX Runtime engine for image classifiers (the brain-MRI tumour demo; CT screening models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medserve.engines.base import ImagingEngine
from medserve.errors import BadRequestError, ConfigurationError, MissingExtraError
from medserve.specs import DeploymentSpec


class OnnxClassifierEngine(ImagingEngine):
    """A single-input, single-output classifier that emits class probabilities.

    Spec parameters: ``labels`` (class names in output order, required),
    ``layout`` (NHWC or NCHW; default NHWC), ``providers`` (ONNX Runtime
    execution providers; default CPU).
    """

    def __init__(self, spec: DeploymentSpec, artifact_path: Path) -> None:
        super().__init__(spec, artifact_path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("onnxruntime is not installed", engine="onnx") from None
        params = spec.model.parameters
        labels = params.get("labels")
        if not isinstance(labels, list) or not labels:
            raise ConfigurationError("onnx classifier specs need parameters.labels", deployment=spec.name)
        self.labels = [str(label) for label in labels]
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, round(spec.resources.num_cpus)) if spec.resources.num_cpus else 1
        providers = params.get("providers") or ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(artifact_path), sess_options=options, providers=providers)
        self._input = self._session.get_inputs()[0]
        self._output = self._session.get_outputs()[0]
        self.layout = str(params.get("layout", "NHWC")).upper()
        shape = self._input.shape
        if self.layout == "NHWC":
            self.input_height, self.input_width, self.input_channels = (int(d) for d in shape[1:4])
        else:
            self.input_channels, self.input_height, self.input_width = (int(d) for d in shape[1:4])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if self.layout == "NCHW":
            batch = np.transpose(batch, (0, 3, 1, 2))
        (probabilities,) = self._session.run([self._output.name], {self._input.name: batch.astype(np.float32)})
        return np.asarray(probabilities, dtype=np.float32)

    def infer_tensors(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if set(inputs) != {self._input.name}:
            raise BadRequestError("unexpected input tensor names", expected=[self._input.name])
        tensor = inputs[self._input.name]
        expected = [d if isinstance(d, int) else -1 for d in self._input.shape]
        if tensor.ndim != len(expected) or any(e not in (-1, got) for e, got in zip(expected, tensor.shape)):
            raise BadRequestError("input tensor has the wrong shape", expected=expected, got=list(tensor.shape))
        (output,) = self._session.run([self._output.name], {self._input.name: tensor.astype(np.float32)})
        return {self._output.name: np.asarray(output)}

    def metadata(self) -> dict[str, Any]:
        def describe(node: Any) -> dict[str, Any]:
            return {
                "name": node.name,
                "datatype": "FP32",
                "shape": [d if isinstance(d, int) else -1 for d in node.shape],
            }

        return {"inputs": [describe(self._input)], "outputs": [describe(self._output)], "labels": self.labels}
