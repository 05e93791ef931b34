"""An interrupted `make test` leaves no process and no temp dir (issue 20 item 5).

Before, Ctrl-C or SIGTERM to make left the daemons fixtures had started (fork servers,
loaderds, the placement service, the S3 server: each in a session of its own, so out of the
terminal's reach) running, and their temp dirs behind. Here make runs pytest on a test that
holds the whole embedded stack up; the run is interrupted the two ways a user does it: Ctrl-C
(SIGINT to the terminal's process group) and SIGTERM to make alone, which make forwards to
pytest. Every process started carries a marker in its environment; afterwards none runs, and
the temp dir the run was given (TMPDIR) holds nothing but torch's cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conditions import wait_for

ROOT = Path(__file__).parents[1]
CACHES = ("torchinductor_",)  # torch's compile cache, kept across runs by design: not a leftover


def marked(marker: str) -> list[int]:
    """Pids of processes whose environment carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or a kernel thread
                pass
    return found


@pytest.mark.parametrize(("how", "pool_size"), [("ctrl-c", 0), ("sigterm to make", 1)])
def test_an_interrupted_run_leaves_no_process_and_no_temp_dir(tmp_path: Path, how: str, pool_size: int) -> None:
    marker = f"HYDRASERVE_INTERRUPT_MARK={uuid.uuid4().hex}"
    temp, ready = tmp_path / "tmp", tmp_path / "ready"
    temp.mkdir()
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"test:\n\t{sys.executable} -m pytest -q -p no:cacheprovider --basetemp {tmp_path / 'base'} "
                        f"{ROOT / 'tests' / 'interrupt_target.py'}\n")
    key, value = marker.split("=")
    env = {**os.environ, key: value, "TMPDIR": str(temp), "INTERRUPT_READY_FILE": str(ready),
           "INTERRUPT_POOL_SIZE": str(pool_size)}
    make = subprocess.Popen(["make", "-s", "-f", str(makefile), "test"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(ready.exists, 120), "the stack did not come up"
        started = marked(marker)
        assert len(started) >= 5, started  # make, pytest, S3, loaderd, placement (and the pool)
        if how == "ctrl-c":
            os.killpg(make.pid, signal.SIGINT)
        else:
            make.send_signal(signal.SIGTERM)
        output = make.communicate(timeout=90)[0].decode(errors="replace")
        assert wait_for(lambda: not marked(marker), 10), (marked(marker), output[-2000:])
        left = sorted(p.name for p in temp.iterdir() if not p.name.startswith(CACHES))
        assert left == [], output[-2000:]
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
        make.kill()
