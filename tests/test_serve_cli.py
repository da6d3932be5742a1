"""`python -m tokenpaint.serve` as a process: flag checks, the URL it prints, SIGTERM draining and exit status 0."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import call, free_port, make_runs  # noqa: E402
from tokenpaint.serve.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("serve_cli"))["mim"]


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--queue-size", "0"], "--queue-size must be >= 1"),
    (["--api-auth", "nopassword"], "--api-auth must be USER:PASS"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--port", "70000"], "--port must be in"),
    (["--dtype", "float64"], "invalid choice"),
])
def test_bad_flags_are_refused_before_loading(run_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(run_dir), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_dir_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path)])
    assert "has no config.json" in capsys.readouterr().err


def test_sigterm_finishes_requests_in_flight_and_exits_0(run_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tokenpaint.serve", "--model", str(run_dir), "--port", str(port),
                             "--no-ui", "--max-wait-ms", "0", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        printed = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in printed
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(url, "GET", "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not come up"
            time.sleep(0.1)
        result = {}
        body = {"prompts": ["a red circle", "a blue star"], "num_images": 2, "steps": 300, "seed": 1}
        client = threading.Thread(target=lambda: result.update(answer=call(url, "POST", "/v1/images", body)))
        client.start()
        while call(url, "GET", "/sdapi/v1/progress")[2]["state"]["job_count"] < 1:  # the request is running
            assert "answer" not in result, "the request finished before it could be seen running"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        status, _, out = result["answer"]
        assert status == 200 and len(out["images"]) == 4  # finished although SIGTERM came first
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # no longer accepting
            call(url, "GET", "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
