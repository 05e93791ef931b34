"""One typed contract per seam between components (pydantic models, enums, a Protocol).

Components import these modules, never each other's internals. One module per seam:
``stage`` (pipeline stage plan), ``model`` (push manifest), ``plan`` (placement API),
``loader`` (loaderd API), ``events`` (CloudEvents types and payloads), ``function`` (a
function's settings, each with its one default), ``durations`` (``7.5s``/``200ms`` text),
``worker`` (a worker's environment and its status), ``timeline`` (cold-start moments),
``pod`` (a worker's role as its pod carries it), ``tensors`` (where a tensor's bytes are),
``backend`` (what the local gateway needs of a backend).
"""
