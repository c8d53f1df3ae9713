"""The afd_torchrun fixture's failure message leads with each failing rank's own first error."""
from pathlib import Path

import pytest

from afd.npu.launch import RankResult

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.timeout(180)
def test_a_job_failing_on_rank_1_only_shows_rank_1s_error_at_the_top(afd_torchrun):
    result = afd_torchrun(SCRIPTS / "fail_on_rank1.py")
    assert result.returncode != 0
    assert result.root_causes == [1], result.output[-3000:]
    message = result.failure()
    lines = message.splitlines()
    assert lines[0].startswith("torchrun job failed after"), message
    assert lines[1] == "--- rank 1 (torchrun's root cause), exit code 1: its first error:", message
    assert lines[2] == "Traceback (most recent call last):", message
    error = message.index("ValueError: rank 1's own error: the root cause")
    assert error < message.index("--- rank 0"), "the root cause leads; the rank torchrun ended comes after it"
    assert "rank 0 is still busy" not in message[:error]
    assert "--- rank 0, killed by SIGTERM: no error in its output" in message
    assert message.index("--- the last 3000 characters of the output:") > error


def test_first_error_is_the_first_traceback_after_what_afd_npu_announced():
    out = "\n".join([
        "starting", "[W1207 socket.cpp:1] a warning", "[afd npu rank1] npu:0 stream 3: npu_x failed: Stall",
        "Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "    f()",
        "afd.npu.streams.StreamError: npu_x: stalled 30.0s", "  waiting for flags", "",
        "Traceback (most recent call last):", '  File "y.py", line 2', "RuntimeError: later"])
    assert RankResult(1, out).first_error().splitlines() == [
        "[afd npu rank1] npu:0 stream 3: npu_x failed: Stall", "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>', "    f()", "afd.npu.streams.StreamError: npu_x: stalled 30.0s",
        "  waiting for flags"]
    assert RankResult(1, "ok\nRuntimeError: no traceback\nmore\n\nnext").first_error() == \
        "RuntimeError: no traceback\nmore"
    assert RankResult(0, "all fine\ndone").first_error() == ""
