import subprocess
import sys

import pytest

from rrec.processes import free_port, stop_process, wait_until_answering


def _url() -> str:
    return f"http://127.0.0.1:{free_port()}/health"  # nothing listens there


def test_wait_names_a_server_that_exited_and_its_output():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"demo exited with status 3 .*Its last output:\nboom"):
        wait_until_answering(proc, _url(), 10, name="demo", output=lambda: "boom")


def test_wait_gives_up_after_its_timeout_and_the_server_is_stopped():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match=r"demo \(pid \d+\) did not answer .* within 0.3 s$"):
            wait_until_answering(proc, _url(), 0.3, name="demo", interval_s=0.05)
    finally:
        stop_process(proc, grace_s=5)
    assert proc.returncode is not None
