"""Medical image input: DICOM and PNG decoding, windowing, model-input tensors."""
