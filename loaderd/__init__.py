"""Per-node loader daemon: S3 -> shared-memory prefetch with per-tensor readiness."""
