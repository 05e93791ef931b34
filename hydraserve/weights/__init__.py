"""Model files as users already have them (HF directory of config, tokenizer and safetensors),
and the one path that moves their bytes.

- ``model_files``: ``ModelFiles`` (what every reader of a model offers) and ``open_model(uri)``
  for a local directory or ``s3://bucket/prefix``; ``model_version``: one version resolved and
  checked (sizes, manifest, headers), keyed so stale bytes are never reused.
- ``safetensors_format``: header parsing and validation (no torch); ``tensors``: zero-copy views.
- ``architectures``: each family's checkpoint naming; ``layout``: the stage slicer, segment
  groups in streaming order, byte profiles and balanced stage plans.
- ``segment``: the shared-memory segment format; ``fetch``: the fetch engine (concurrent ranged
  reads into segments, first layers first, per-tensor sha256); ``segment_tensors`` and
  ``fetched_source``: tensor sources over segments; ``local``: memory-mapped local files.
- ``s3``: the only module that talks to S3 (client, the one retry budget, resume, error
  mapping); ``retry``: its policy; ``s3_uri``: URI parsing and key/file-name safety (no boto3).
- ``manifest`` / ``push``: push manifests (sha256) and ``hydraserve model push``.
"""
