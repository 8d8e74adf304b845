"""The export stage, a module per job: recipes, ONNX export and int8, parity, golden samples.

The recipes themselves are data, in the repository's top-level export/ folder.
"""
