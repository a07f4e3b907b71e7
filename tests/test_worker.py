"""The export worker (mnv4_deploy/infra/worker.py): slow exports in a forked process beside the main one's work.

The worker's jobs run in another process and come back by name, their errors as themselves (a user mistake stays a
one-line UserError); a worker that dies is named, and an interrupted run ends it at once and leaves no folder
behind. Through the pipeline: a target that `exports_in_worker` is exported in the worker and verified in the main
process (tests/folder_target.py's two targets, a second each). The conformance suite runs TFLite and ExecuTorch
through the worker on real artifacts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from mnv4_deploy.errors import UserError
from mnv4_deploy.infra import worker
from mnv4_deploy.targets import register_target, unregister_target

REPO = Path(__file__).resolve().parent.parent
TARGETS = [("folder", "tests.folder_target:FolderTarget"), ("folder_worker", "tests.folder_target:WorkerFolderTarget")]
RECIPE = REPO / "tests" / "small.yaml"

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the export worker forks: Linux only"),
    # Earlier tests in the session import JAX, which warns at every fork; these tests' children never use it.
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def folder_targets() -> Iterator[None]:
    for t in TARGETS:
        register_target(*t)
    yield
    for name, _ in TARGETS:
        unregister_target(name)


class Unpicklable(Exception):
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("not picklable")


def _start(jobs: list) -> worker.Worker:
    """A worker forked whatever threads earlier tests left in this process (the pipeline would not fork then)."""
    return worker.Worker(jobs)


def _fail() -> None:
    raise UserError("--thing must be positive")


def _fail_unpicklable() -> None:
    raise Unpicklable("a converter's own exception type")


def test_jobs_run_in_another_process_and_come_back_by_name() -> None:
    w = _start([("a", os.getpid), ("b", lambda: 6 * 7)])
    try:
        assert w.result("b")[0] == 42  # asked out of order: 'a' is kept until asked for
        pid, seconds = w.result("a")
        assert pid != os.getpid() and isinstance(seconds, dict)
    finally:
        w.close()


def test_a_failed_job_raises_its_own_error_and_the_others_still_run() -> None:
    w = _start([("bad", _fail), ("odd", _fail_unpicklable), ("good", lambda: "ok")])
    try:
        with pytest.raises(UserError, match="--thing must be positive"):
            w.result("bad")
        with pytest.raises(worker.WorkerError, match="Unpicklable: a converter's own exception type"):
            w.result("odd")
        assert w.result("good")[0] == "ok"
    finally:
        w.close()


def test_a_worker_that_dies_is_named() -> None:
    w = _start([("dies", lambda: os._exit(9))])
    try:
        with pytest.raises(worker.WorkerError, match="ended before finishing 'dies' .exit code 9"):
            w.result("dies")
    finally:
        w.close()


def test_closing_ends_a_busy_worker_at_once() -> None:
    w = _start([("slow", lambda: time.sleep(60))])
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 10


def test_no_worker_beside_another_thread() -> None:
    """A lock held by another thread at fork time stays locked forever in the child: then no worker."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not worker.available() and worker.start([("x", lambda: 1)]) is None
    finally:
        stop.set()
        t.join()


def test_the_worker_takes_the_longest_exports_until_it_has_as_much_work_as_the_main_process() -> None:
    from types import SimpleNamespace as T

    from mnv4_deploy.pipeline import _worker_targets

    onnx, openvino, coreml = (T(name=n, exports_in_worker=False, work_seconds=s)
                              for n, s in (("onnx", 12), ("openvino", 9), ("coreml", 17)))
    tflite, executorch = (T(name=n, exports_in_worker=True, work_seconds=s) for n, s in (("tflite", 14),
                                                                                          ("executorch", 55)))
    names = lambda ts: [t.name for t in _worker_targets(ts)]  # noqa: E731
    assert names([onnx, tflite, openvino, coreml]) == ["tflite"]
    assert names([onnx, tflite, openvino, coreml, executorch]) == ["executorch"]  # tflite stays: 55 s > 38 s
    assert names([tflite, executorch]) == ["tflite"]  # one target is left to this process
    assert names([tflite]) == [] and names([onnx, coreml]) == []


def _argv(out: Path, targets: str = "folder,folder_worker") -> list[str]:
    return ["-q", "convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "32",
            "--to", targets, "--out", str(out), "--recipe", str(RECIPE), "--latency-runs", "1", "--no-progress"]


def _cli(args: list[str], **env: str) -> subprocess.Popen:
    """The CLI with both folder targets registered, in a fresh process (one thread: the worker can fork)."""
    code = ("import sys; from mnv4_deploy.targets import register_target; "
            + "; ".join(f"register_target{t!r}" for t in TARGETS)
            + "; from mnv4_deploy.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **env))


def test_a_worker_target_is_exported_there_and_verified_here(tmp_path: Path) -> None:
    proc = _cli(_argv(tmp_path))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    manifests = {t: json.loads((tmp_path / t / "manifest.json").read_text()) for t in ("folder", "folder_worker")}
    assert manifests["folder"]["export"]["exported_by_pid"] == proc.pid
    assert manifests["folder_worker"]["export"]["exported_by_pid"] != proc.pid
    timings = manifests["folder_worker"]["timings"]["target"]
    assert {"export", "export_wait", "verify", "latency"} <= set(timings)  # the worker's export time comes back
    assert manifests["folder_worker"]["verification"]["gate"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "folder_worker"]  # nothing staged is left


def test_alone_a_worker_target_exports_in_the_main_process(tmp_path: Path) -> None:
    from mnv4_deploy.cli import main

    assert main(_argv(tmp_path, "folder_worker")) == 0
    manifest = json.loads((tmp_path / "folder_worker" / "manifest.json").read_text())
    assert manifest["export"]["exported_by_pid"] == os.getpid() and "export_wait" not in manifest["timings"]["target"]


def test_sigterm_while_the_worker_exports_ends_it_and_leaves_nothing(tmp_path: Path) -> None:
    gate = tmp_path / "never"  # the worker's export waits for this file, which never comes
    out = tmp_path / "out"
    proc = _cli(_argv(out), MNV4_TEST_EXPORT_WAIT=str(gate))
    deadline = time.monotonic() + 120
    children: list[int] = []
    while not children and time.monotonic() < deadline:  # until the worker has been forked
        time.sleep(0.1)
        listed = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        children = [int(p) for p in listed]
    assert children, "no worker process was started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "no partial artifacts were left" in err and "Traceback" not in err, err
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not out.exists() or sorted(p.name for p in out.rglob("*")) == []


def test_a_real_tflite_export_in_the_worker_is_verified_like_any_other(tmp_path: Path) -> None:
    """litert-torch's conversion (which imports JAX) runs in the forked worker; its int8 artifact passes the same
    checks in the main process, and the main process never imported JAX (a later run could still fork)."""
    script = ("import sys; from mnv4_deploy.cli import main; code = main(sys.argv[1:]); "
              "print('jax imported' if 'jax' in sys.modules else 'no jax'); sys.exit(code)")
    args = ["-q", "convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", "32",
            "--to", "onnx,tflite", "--int8", "--out", str(tmp_path), "--recipe", str(RECIPE), "--latency-runs", "1",
            "--no-progress", "--no-verify-gate"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "no jax"
    manifest = json.loads((tmp_path / "tflite" / "manifest.json").read_text())
    assert "export_wait" in manifest["timings"]["target"]
    summary = manifest["verification"]["tensorwise"]
    assert summary["matched"] == summary["pytorch_quantizers"] and summary["flagged"] == 0, summary
