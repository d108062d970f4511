"""Training our own super-resolution models (issue 14): data, architectures, the loop, ONNX export.

Pure PyTorch on the CPU. Entry point: `python -m training` (or `superres-train`). See models/weights/*.md.
"""
