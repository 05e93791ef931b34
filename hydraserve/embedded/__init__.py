"""The embedded deployment's own services: everything ``hydraserve up``/``demo`` start on one
machine and Kubernetes never runs.

``stack`` wires them (gateway, placement, loaderds, warm pools, S3) and ``supervisor`` restarts
what dies; ``s3``/``moto_main`` are a real S3 server (moto) in a subprocess; ``netns`` the
emulated cluster's nodes (network namespaces and tc); ``aio_server`` runs the gateway's aiohttp
app on a thread; ``demo_model``/``demo_client`` the demo's model and its client.
"""
