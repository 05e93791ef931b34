"""Model code: compact PyTorch Llama-family and OPT decoders, sliceable into pipeline stages.

config.py parses HF config.json; names.py maps our parameters to checkpoint tensor names per
stage; llama.py / opt.py are the networks; loader.py builds a stage on the meta device and
pulls in only its own tensors from a TensorSource; files.py opens a model directory or URI.
"""
