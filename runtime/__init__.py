"""The function runtime: what runs inside a function's worker process (or pod), in both
deployments.

``worker``/``startup``: the worker's start-up, overlapping process start, device init and
weight loading; ``serving``: vLLM serving the function (OpenAI and CloudEvents), the load
format over loaderd's shared memory, stages of a pipeline group and their consolidation;
``engine``/``model``: the compact engine that answers the first tokens.
``embedded/``: the node's warm pool (the fork server and its client), run only by the embedded
deployment.
"""
