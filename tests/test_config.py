"""Config, run names, launcher checks, wire framing, error agreement (no Ray, no MPI)."""

from __future__ import annotations

import pytest

from insitu.comm import launcher_mismatch, raise_common
from insitu.config import Backpressure, Config, FailurePolicy, resolve_run
from insitu.errors import ConfigError, ContractError, RunNameError, SendError
from insitu.transport import decode_frames, encode_frame


def test_env_and_overrides() -> None:
    cfg = Config.from_env({"INSITU_IN_FLIGHT": "4", "INSITU_BACKPRESSURE": "SKIP", "INSITU_DEADLINE": "2.5"},
                          on_analytics_failure="raise")  # fmt: skip
    assert cfg.in_flight == 4
    assert cfg.backpressure is Backpressure.SKIP
    assert cfg.on_analytics_failure is FailurePolicy.RAISE
    assert cfg.deadline == 2.5


@pytest.mark.parametrize(
    ("env", "pattern"),
    [
        ({"INSITU_IN_FLIGHT": "0"}, ">= 1"),
        ({"INSITU_IN_FLIGHT": "two"}, "integer"),
        ({"INSITU_BACKPRESSURE": "wait"}, "'block', 'skip'"),
        ({"INSITU_DEADLINE": "-1"}, "> 0"),
    ],
)
def test_invalid_values_list_what_is_allowed(env: dict[str, str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        Config.from_env(env)


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match="unknown config field"):
        Config.from_env({}, bogus=1)


def test_no_address_is_an_error() -> None:
    with pytest.raises(ConfigError, match="INSITU_ADDRESS"):
        Config().require_address()


def test_run_name_resolution() -> None:
    assert resolve_run("a", Config(run="b"), {"SLURM_JOB_ID": "c"}) == "a"
    assert resolve_run(None, Config(run="b"), {"SLURM_JOB_ID": "c"}) == "b"
    assert resolve_run(None, Config(), {"SLURM_JOB_ID": "c"}) == "c"
    with pytest.raises(RunNameError, match="INSITU_RUN"):
        resolve_run(None, Config(), {})
    with pytest.raises(RunNameError, match="without"):
        resolve_run("a b", Config(), {})


def test_launcher_mismatch() -> None:
    assert launcher_mismatch(1, {"PMI_SIZE": "4"}) is not None
    assert launcher_mismatch(4, {"OMPI_COMM_WORLD_SIZE": "4"}) is None
    assert "SLURM_STEP_NUM_TASKS=3" in launcher_mismatch(1, {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3"})
    # the batch step of an sbatch script is not a parallel launch
    assert launcher_mismatch(1, {"SLURM_STEP_ID": "batch", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert launcher_mismatch(2, {}) is None


def test_raise_common_names_every_failing_rank() -> None:
    with pytest.raises(SendError, match=r"ranks 1, 3: bad shape; rank 2: bad dtype"):
        raise_common(
            [None, (1, "SendError", "bad shape"), (2, "ContractError", "bad dtype"), (3, "SendError", "bad shape")]
        )
    with pytest.raises(ContractError):
        raise_common([(0, "NotAnInsituError", "x")])
    raise_common([None, None])  # nothing to raise


def test_frames_roundtrip_partial() -> None:
    data = encode_frame(("a", 1)) + encode_frame({"b": 2})
    buf = bytearray(data[:-3])
    assert list(decode_frames(buf)) == [("a", 1)]
    buf += data[-3:]
    assert list(decode_frames(buf)) == [{"b": 2}]
    assert buf == bytearray()
