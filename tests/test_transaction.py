"""An artifact folder `OUT/<target>/` is one transaction (mnv4_deploy/transaction.py): a reader never sees a model
beside a manifest that is not its own, nothing stale survives, a second writer is refused in one line, and an
interrupt (Ctrl-C or SIGTERM) leaves the previous folder as it was.

Most tests convert with tests/folder_target.py (a folder artifact written in a second); the concurrency test runs
real ONNX converts in parallel processes.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from mnv4_deploy.cli import main
from mnv4_deploy.fileio import atomic_path, sha256_of
from mnv4_deploy.targets import register_target, unregister_target

REPO = Path(__file__).resolve().parent.parent
TARGET = ("folder", "tests.folder_target:FolderTarget")
RECIPE = REPO / "tests" / "small.yaml"  # few held-back images: these tests are about files, not numbers


def argv(out: Path, size: int = 32, target: str = "folder") -> list[str]:
    return ["-q", "convert", "--model", "mobilenetv4_conv_small_035", "--weights", "random", "--input-size", str(size),
            "--to", target, "--out", str(out), "--recipe", str(RECIPE), "--latency-runs", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def folder_target() -> Iterator[None]:
    register_target(*TARGET)
    yield
    unregister_target(TARGET[0])


def ours(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("mnv4-deploy:")]


def manifest_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def pair_matches(folder: Path) -> bool:
    """The artifact in `folder` is the one its manifest describes."""
    m = manifest_of(folder)
    return sha256_of(folder / m["artifact"]["file"]) == m["artifact"]["sha256"]


def leftovers(out: Path) -> list[str]:
    """Hidden files and folders anywhere under OUT: temporary/staging paths and lock files."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    assert main(argv(out, 32)) == 0
    assert pair_matches(out / "folder") and manifest_of(out / "folder")["input"]["shape"] == [1, 3, 32, 32]
    return out


@pytest.fixture()
def built(built_once: Path, tmp_path: Path) -> Path:
    """OUT with a 32x32 folder artifact (a copy of one convert's)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built_once, out)
    return out


# ---------------------------------------------------------------- issue 24, defect 1: model and manifest together
def test_interrupt_between_artifact_and_manifest_keeps_the_old_pair(built: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the manifest is written (after the artifact exists): the folder keeps its old pair."""
    dumps = json.dumps

    def interrupted(obj: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(obj, dict) and "artifact" in obj and "schema_version" in obj:  # a manifest
            raise KeyboardInterrupt
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", interrupted)
    assert main(argv(built, 40)) == 130
    monkeypatch.undo()
    assert ours(capsys.readouterr().err) == ["mnv4-deploy: interrupted; no partial artifacts were left"]
    folder = built / "folder"
    assert pair_matches(folder), "a new model beside the old manifest"
    assert manifest_of(folder)["input"]["shape"] == [1, 3, 32, 32]
    assert leftovers(built) == []


def test_inspect_says_when_the_artifact_is_not_the_manifests(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = built / "folder"
    assert main(["inspect", str(folder)]) == 0
    capsys.readouterr()
    with open(folder / "model" / "weights.pt", "ab") as f:
        f.write(b"\0")  # what an interrupted older version, or an edit, leaves
    assert main(["inspect", str(folder)]) == 2
    captured = capsys.readouterr()
    err = ours(captured.err)
    assert len(err) == 1 and "does not match its manifest.json" in err[0] and "rebuild it" in err[0], err
    assert captured.out == ""


# ---------------------------------------------------------------- defect 2: one writer per folder
def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": 4242, "host": "ci-runner-7", "started": "2026-12-06T07:00:00+00:00",
              "command": "mnv4-deploy convert --model mobilenetv4_conv_small --to folder --out out"}
    fd = os.open(out / ".folder.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps(holder).encode())
        started = time.perf_counter()
        assert main(argv(out)) == 2
        assert time.perf_counter() - started < 10  # refused before the model is loaded
    finally:
        os.close(fd)
    err = ours(capsys.readouterr().err)
    assert len(err) == 1 and "is being written by another run (pid 4242 on ci-runner-7" in err[0], err
    assert "give this run another --out" in err[0]
    assert not (out / "folder").exists()


# ---------------------------------------------------------------- defect 3: nothing stale survives
def test_nothing_stale_survives_a_new_artifact(built: Path) -> None:
    folder = built / "folder"
    (folder / "tensorwise.json").write_text("{}")  # an int8 artifact's table beside an fp32 one
    (folder / "manifest.failed.json").write_text("{}")
    (folder / ".model.abcd1234").mkdir()  # what an older version's killed run left inside
    (built / ".folder.staging-dead0001").mkdir()  # what a SIGKILLed run leaves beside
    (built / ".folder.staging-dead0001" / "model").write_text("half")
    assert main(argv(built, 40)) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model"]
    assert pair_matches(folder) and manifest_of(folder)["input"]["shape"] == [1, 3, 40, 40]
    assert leftovers(built) == []


def test_a_refused_artifact_keeps_the_previous_one(built: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from tests.folder_target import FolderRunner

    folder = built / "folder"
    before = sha256_of(folder / "model")
    monkeypatch.setattr(FolderRunner, "__call__", lambda self, x: np.full((len(x), 1000), np.nan, np.float32))
    assert main(argv(built, 40)) == 1
    err = ours(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("mnv4-deploy: verification failed: [folder] fp32: finite outputs")
    assert sha256_of(folder / "model") == before and pair_matches(folder)
    assert json.loads((folder / "manifest.failed.json").read_text())["input"]["shape"] == [1, 3, 40, 40]
    monkeypatch.undo()
    assert main(argv(built, 40)) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model"] and pair_matches(folder)
    assert leftovers(built) == []


# ---------------------------------------------------------------- defect 4: folders replaced in one step
def _write_folder(final: Path, tag: str) -> None:
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "model.xml").write_text(tag)
        (tmp / "model.bin").write_text(tag)


def _whole(final: Path) -> str:
    """The tag of a whole folder artifact (both files from one writer)."""
    xml, bin_ = (final / "model.xml").read_text(), (final / "model.bin").read_text()
    assert xml == bin_, "a folder mixing two writers"
    return xml


def test_an_interrupted_folder_replacement_leaves_a_whole_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "model"
    _write_folder(final, "old")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # Ctrl-C at the rename that puts the new folder in place

    monkeypatch.setattr(os, "replace", interrupted)
    monkeypatch.setattr(os, "rename", interrupted)
    try:
        _write_folder(final, "new")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert final.is_dir(), "no artifact at all"
    assert _whole(final) in ("old", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_racing_folder_writers_never_fail(tmp_path: Path) -> None:
    final = tmp_path / "model"
    errors: list[BaseException] = []

    def writer(tag: str) -> None:
        for _ in range(60):
            try:
                _write_folder(final, tag)
            except OSError as exc:  # 'Directory not empty' / 'No such file or directory' before
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _whole(final) in ("a", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_portable_swap_finishes_before_an_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without renameat2 the old folder is moved aside first; Ctrl-C between the two renames waits for both."""
    from mnv4_deploy import fileio

    final = tmp_path / "model"
    _write_folder(final, "old")
    monkeypatch.setattr(fileio, "_renameat2", None)
    rename = os.rename

    def rename_then_ctrl_c(src: Any, dst: Any) -> None:
        rename(src, dst)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _write_folder(final, "new")
    monkeypatch.undo()
    assert _whole(final) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_moved_aside_by_a_killed_run_comes_back(tmp_path: Path) -> None:
    """The portable swap's worst case (killed between its renames): the next run restores the old folder."""
    from mnv4_deploy.transaction import lock_target

    out = tmp_path / "out"
    _write_folder(out / ".folder.old-1234abcd", "old")
    (out / ".folder.staging-5678abcd").mkdir()
    lock = lock_target(out / "folder")
    try:
        assert _whole(out / "folder") == "old"
        assert sorted(p.name for p in out.iterdir()) == [".folder.lock", "folder"]
    finally:
        lock.release()
    assert [p.name for p in out.iterdir()] == ["folder"]


# ---------------------------------------------------------------- defect 5: SIGTERM as SIGINT
def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3", **extra)


def _convert_process(args: list[str], **env: str) -> subprocess.Popen:
    code = (f"import sys; from mnv4_deploy.targets import register_target; register_target{TARGET!r}; "
            "from mnv4_deploy.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143),
                                       pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],  # as before
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_export_leaves_nothing(built: Path, sig: int, code: int) -> None:
    proc = _convert_process(argv(built, 40), MNV4_TEST_EXPORT_SECONDS="60")
    deadline = time.monotonic() + 120
    while not [p for p in leftovers(built) if not p.endswith(".lock")] and time.monotonic() < deadline:
        time.sleep(0.05)  # until the export has started writing
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert len(ours(err)) == 1 and "no partial artifacts were left" in ours(err)[0] and "Traceback" not in err, err
    assert leftovers(built) == []
    assert pair_matches(built / "folder") and manifest_of(built / "folder")["input"]["shape"] == [1, 3, 32, 32]


# ---------------------------------------------------------------- N writers at once, a reader polling
def _look(folder: Path) -> Any:
    """One reader's look at a folder, as a careful script does it without mnv4-deploy: the manifest, the
    artifact's sha256, the manifest again. None when the folder changed during the look (or is not there)."""
    try:
        before = (folder / "manifest.json").read_bytes()
        m = json.loads(before)
        actual = sha256_of(folder / m["artifact"]["file"])
        if (folder / "manifest.json").read_bytes() != before:
            return None
    except (OSError, ValueError):
        return None
    return m["artifact"]["sha256"], actual


@pytest.mark.parametrize("others", [2, pytest.param(6, marks=pytest.mark.slow)])
def test_concurrent_converts_leave_matching_pairs(built: Path, tmp_path: Path, others: int) -> None:
    """While one convert is writing a folder, more converts into the same --out start at once: each is
    refused in one line naming the first (before: all exited 0 and all but one artifact were silently lost),
    the first completes, and a reader polling the folder never sees a model with another's manifest."""
    out, folder, go = built, built / "folder", tmp_path / "go"
    looks, mismatches, versions = 0, [], set()
    done = threading.Event()

    def poll() -> None:
        nonlocal looks
        while not done.is_set():
            look = _look(folder)
            if look is not None:
                looks += 1
                versions.add(look[0])
                if look[0] != look[1]:
                    mismatches.append(look)
            time.sleep(0.005)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        first = _convert_process(argv(out, 40), MNV4_TEST_EXPORT_WAIT=str(go))
        deadline = time.monotonic() + 120
        while not leftovers(out) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first run has started writing (its lock, or before: its temporary folder)
        procs = [_convert_process(argv(out, 48 + 8 * i)) for i in range(others)]
        results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
        go.touch()
        first_rc, first_err = first.wait(timeout=300), first.communicate()[1]
    finally:
        go.touch()
        done.set()
        reader.join()
    assert first_rc == 0, first_err
    for rc, err in results:
        assert "Traceback" not in err, err
        assert rc == 2 and len(ours(err)) == 1 and "is being written by another run (pid" in ours(err)[0], err
    assert pair_matches(folder) and manifest_of(folder)["input"]["shape"] == [1, 3, 40, 40]
    assert leftovers(out) == []
    assert mismatches == [] and looks > 0 and len(versions) == 2, (looks, mismatches, versions)
