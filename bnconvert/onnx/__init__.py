"""ONNX export: the native emitter, the tf2onnx fallback and the onnxruntime gate.

`export.export_onnx` chooses the exporter; `walk` is the native
exporter's walk over a Keras graph, `graph` its ONNX graph with per-value
layouts, and `layers`, `shape`, `ops` and `activations` its emitter tables;
`tf2onnx` is the fallback and `check` the onnxruntime comparison.
"""
