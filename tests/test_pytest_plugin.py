"""The pytest plugin: fixtures work in a user's suite and a leaking test is caught."""
import pytest

pytest_plugins = ["pytester"]


@pytest.mark.timeout(120)
def test_leaking_segment_is_caught(pytester):
    pytester.makepyfile(test_leak="""
        from afd import device

        def test_leaks():
            device.malloc(4096)  # never freed

        def test_clean():
            buf = device.malloc(4096)
            device.free(buf)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)  # the body passes; the leak fails teardown
    result.stdout.fnmatch_lines(["*test left behind shared-memory segments*afd-*"])


@pytest.mark.timeout(120)
def test_leaking_process_is_caught(pytester):
    pytester.makepyfile(test_proc="""
        import subprocess, sys

        def test_leaks_a_process():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*test left behind processes*"])


@pytest.mark.timeout(180)
def test_fixtures_in_a_user_suite(pytester):
    pytester.makepyfile(test_user="""
        def test_default_config(afd_config):
            assert afd_config.sessions == 1

        def test_pipeline_fixture(afd_pipeline):
            result = afd_pipeline(steps=2).wait()
            assert result.outcome == "completed"
            assert result.outputs_match_reference
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.mark.timeout(120)
def test_exception_inside_with_block_leaves_nothing(tmp_path):
    import os

    from afd import Pipeline, control, device
    with pytest.raises(RuntimeError):
        with Pipeline({"name": "t-exc", "steps": 100000}) as pipeline:
            import time
            time.sleep(1.0)
            raise RuntimeError("user code failed mid-run")
    for pid in pipeline.pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert device.list_segments(pipeline.device.namespace) == []
    assert not (control.runs_root() / pipeline.device.namespace).exists()
