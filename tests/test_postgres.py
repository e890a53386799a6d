"""Several workers on one study in a real PostgreSQL server, one of them killed mid-trial.

The server is a throwaway cluster started here (Debian's postgresql package; `.ci/run` installs
it), on loopback, removed afterwards. Without one the test skips with the reason, except
under CI (`GGUF_ABLITERATE_CI=1`), where it fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli
from test_optimise import FAST, _optimise

from gguf_abliterate.formats.direction_file import load_direction


def _unavailable(why: str) -> None:
    if os.environ.get("GGUF_ABLITERATE_CI"):
        pytest.fail(f"CI must run the PostgreSQL test: {why}")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new PostgreSQL cluster on loopback, as its superuser, trusted; removed afterwards."""
    found = [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]
    initdb = next((f for f in found if f), None)
    if initdb is None:
        _unavailable("no PostgreSQL server here (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's PostgreSQL driver)
    except ImportError:
        _unavailable("no psycopg (pip install 'psycopg[binary]')")
    assert initdb is not None
    bin_dir = Path(os.path.realpath(initdb)).parent
    root = Path(tempfile.mkdtemp(prefix="gguf-abliterate-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to the postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"could not start a PostgreSQL cluster: {e}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _trials(url: str) -> list[tuple[int, str, int | None, int | None]]:
    """(number, state, worker pid, the failed trial it retries) of every trial, from the tables."""
    import psycopg

    with psycopg.connect(url) as c, c.cursor() as cur:
        cur.execute("SELECT t.number, t.state, w.value_json, r.value_json FROM trials t "
                    "LEFT JOIN trial_user_attributes w ON w.trial_id = t.trial_id AND w.key = 'worker' "
                    "LEFT JOIN trial_system_attributes r ON r.trial_id = t.trial_id AND r.key = 'failed_trial' "
                    "ORDER BY t.number")
        return [(n, s, None if w is None else int(w), None if f is None else int(f)) for n, s, w, f in cur.fetchall()]


def test_workers_on_postgresql_survive_a_killed_worker(tiny: dict[str, Path], tmp_path: Path,
                                                        postgres_url: str) -> None:
    """Three workers on one study; one is killed (SIGKILL) while its trial runs. The study still
    finishes exactly the trials asked for: the dead worker's trial is marked failed once its
    heartbeat is old and run again by another, none counted twice; `--resume` from the database
    alone writes the same result."""
    url, model, out, trials = postgres_url, tiny["llama-nobias"], tmp_path / "edit.safetensors", 30
    made = cli("optimise", model, "-o", out, "--storage", url, "--trials", "2", *FAST)
    assert made.returncode == 0, made.stderr
    args = ["--trials", str(trials), "--patience", "1000", *FAST]
    main = _optimise(model, "-o", out, "--storage", url, "--resume", "--force", *args)
    victim = _optimise(model, "--join", url, *args)
    other = _optimise(model, "--join", url, *args)
    deadline, killed = time.monotonic() + 300, None
    while killed is None and time.monotonic() < deadline and victim.poll() is None:
        running = [n for n, state, worker, _ in _trials(url) if state == "RUNNING" and worker == victim.pid]
        if running:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed = running[0]
        time.sleep(0.01)
    assert killed is not None, "the victim finished before it could be caught mid-trial"
    for p in (main, other):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    rows = _trials(url)
    complete = [r for r in rows if r[1] == "COMPLETE"]
    assert len(complete) == trials and len({r[0] for r in complete}) == trials
    assert next(r for r in rows if r[0] == killed)[1] == "FAIL"
    retried = [r for r in complete if r[3] == killed]
    assert len(retried) == 1 and retried[0][2] != victim.pid  # run again, by a live worker
    assert sorted(t["number"] for t in load_direction(out).trials) == sorted(r[0] for r in complete)
    again = tmp_path / "again.safetensors"
    resumed = cli("optimise", model, "-o", again, "--storage", url, "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    first, second = load_direction(out), load_direction(again)
    assert first.trials == second.trials
    assert first.metadata["chosen_trial"] == second.metadata["chosen_trial"]
    assert (first.vectors == second.vectors).all()
    assert all(r[1] in ("COMPLETE", "FAIL") for r in _trials(url))  # the resume ran no trial
