"""edgec: compile ONNX and TFLite models into small, verified bundles for edge boards, on Apache TVM."""
__version__ = "0.1.0"
