"""Not collected on its own (no ``test_`` prefix): tests/test_interrupted_run.py runs it under
make and interrupts the run while the embedded stack it starts is up."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydraserve.embedded.stack import LocalStack, StackOptions


def test_holds_the_embedded_stack_until_interrupted(tiny_llama_dir: Path) -> None:
    options = StackOptions(nodes=1, model_dir=tiny_llama_dir, progress=False,
                           pool_size=int(os.environ["INTERRUPT_POOL_SIZE"]))
    with LocalStack(options):
        Path(os.environ["INTERRUPT_READY_FILE"]).write_text("up")
        time.sleep(600)
