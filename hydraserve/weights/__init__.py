"""Model files as users already have them (HF directory of config, tokenizer and safetensors).

Safetensors header parsing, tensor-name -> layer mapping per architecture, byte ranges of a
stage, the S3 ranged client (the only code that talks to S3), push manifests, and the tensor
sources the runtime loads from (local directory, S3, loaderd shared memory).
"""
