"""Embedded services for the one-machine default: a real S3 server (moto) in a subprocess.

Used by ``hydraserve demo`` / ``hydraserve up`` and by the test suite (``s3_server`` fixture).
"""
