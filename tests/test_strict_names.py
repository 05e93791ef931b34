"""Names are matched whole (issue 22 item 10): Python's ``$`` also matches before a trailing
newline, so ``re.match(r"^...$")`` let "fn\\n" through as a function name (and the same held for
bucket names, model file names and loaderd node names)."""

from __future__ import annotations

import pytest

from hydraserve.contracts.function import validate_function_name
from hydraserve.errors import InvalidRequestError
from hydraserve.loaderd.registry import Registry
from hydraserve.weights.s3_uri import validate_bucket, validate_file_name


@pytest.mark.parametrize("check", [validate_function_name, validate_bucket, validate_file_name])
def test_a_trailing_newline_is_refused(check: object) -> None:
    good = {validate_function_name: "fn-1", validate_bucket: "models", validate_file_name: "model.safetensors"}[check]
    assert check(good) == good  # type: ignore[operator]
    with pytest.raises((ValueError, InvalidRequestError)):
        check(good + "\n")  # type: ignore[operator]


def test_a_node_name_with_a_trailing_newline_is_refused(tmp_path: object) -> None:
    with pytest.raises(InvalidRequestError, match="node name"):
        Registry("node0\n", 1 << 20, shm_dir=str(tmp_path))
