"""Model files as users already have them (HF directory of config, tokenizer and safetensors).

- ``model_files``: ``open_model(uri)`` for a local directory or ``s3://bucket/prefix``: files,
  tensor index (file + absolute byte range of every tensor), tensor sources.
- ``safetensors_format``: header parsing and validation; tensors as views of fetched buffers.
- ``layout``: tensor name -> role/layer (llama family, OPT), stage slices, balanced stage plans.
- ``ranges``: which byte ranges fetch a set of tensors (coalesced, chunked, layer order).
- ``s3``: the only module that talks to S3 (client, retries, resume, error mapping);
  ``s3_uri``: URI parsing and key/file-name safety (no boto3).
- ``s3_source`` / ``local``: TensorSource implementations (``source`` is the protocol).
- ``manifest`` / ``push``: push manifests (sha256) and ``hydraserve model push``.
- ``throughput``: measure S3 fetch throughput for a chunk size and concurrency.
"""
