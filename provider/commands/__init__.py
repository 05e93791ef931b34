"""CLI commands of the placement component: `placement`, `plan`, `simulate` (see hydraserve.cli)."""
