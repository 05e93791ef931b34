"""Wire contracts shared by several components, typed with pydantic.

Components import these modules, never each other's internals. One module per area:
``stage`` (pipeline stage plan), ``model`` (push manifest), ``plan`` (placement API),
``loader`` (loaderd API), ``events`` (CloudEvents types and payloads), ``function`` (a
function's settings, each with its one default), ``durations`` (``7.5s``/``200ms`` text).
"""
