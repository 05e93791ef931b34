"""Model code: compact PyTorch Llama-family and OPT decoders, sliceable into pipeline stages.

config.py parses HF config.json; llama.py / opt.py are the networks (their parameters are named
after hydraserve.weights.architectures' tables, which map checkpoint names to them);
loader.py builds a stage on the meta device and pulls in only the tensors the stage slicer
gives it from a TensorSource.
"""
