"""A one-node SLURM cluster on localhost for the SLURM tests (Debian's ``slurm-wlm`` + ``munge``).

:func:`start_local_slurm` writes a ``slurm.conf`` into a temporary folder and starts a private
munged (own key and socket), slurmctld and slurmd, all bound to 127.0.0.1 on free ports, as root
(slurmd starts jobs as their user). Client commands find the cluster through ``SLURM_CONF``
(:meth:`LocalSlurm.env`). Settings that make the tests fast without changing what is tested:

- ``cred_expire=10``: a requeued job may start 10 s after its requeue (default 120 s);
- ``sched/builtin`` every 2 s: the requeued job starts as soon as it may, with its new end time
  (under sched/backfill, 22.05 sent the ``--signal`` warning at once to a requeued job that
  backfill started, judging by the end time estimated while it was pending);
- ``KillWait=30``: after a scancel or time limit, tasks have 30 s between SIGTERM and SIGKILL.

slurmctld checks the time limits (and sends ``--signal`` warnings) every 30 s, so a job with
``--time 1 --signal SIGUSR1@50`` gets its SIGUSR1 10-40 s after it starts.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning.pytorch import Callback

ENDED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)
TOOLS = (
    "munged",
    "mungekey",
    "slurmctld",
    "slurmd",
    "sbatch",
    "scontrol",
    "sinfo",
    "squeue",
    "scancel",
)


def require_slurm() -> None:
    """The SLURM daemons and root (slurmd runs jobs as their user). In CI (``CI`` set) a missing
    scheduler fails the run; elsewhere the SLURM tests are skipped, saying why."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    reason = None
    if missing:
        reason = f"SLURM tests need {', '.join(missing)} (apt-get install slurm-wlm munge)"
    elif os.geteuid() != 0:
        reason = "SLURM tests start slurmd, which must run as root"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalSlurm:
    """A running one-node cluster; ``folder`` holds its config, state and daemon logs."""

    folder: Path
    node: str

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment plus what SLURM's commands need to find the cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def run(self, *command: str, **kwargs) -> str:
        result = subprocess.run(
            command, env=self.env(), capture_output=True, text=True, timeout=60, **kwargs
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit a job from ``cwd`` (its SLURM_SUBMIT_DIR); returns the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env=self.env(**(env or {})),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job`` records of a job (one per array task)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        return [
            dict(field.split("=", 1) for field in line.split() if "=" in field)
            for line in text.splitlines()
            if line.strip()
        ]

    def wait(self, job_id: int, timeout_s: float) -> list[dict[str, str]]:
        """Wait until every task of the job has ended; returns their records."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.jobs(job_id)
            if records and all(r["JobState"] in ENDED for r in records):
                return records
            if time.monotonic() > deadline:
                states = [(r.get("JobId"), r.get("JobState"), r.get("Restarts")) for r in records]
                raise TimeoutError(f"job {job_id} still running after {timeout_s} s: {states}")
            time.sleep(1)

    def stop(self) -> None:
        """Cancel every job, wait (up to a minute) for them to end, then stop the daemons."""
        env = self.env()
        command = ["scancel", "--full", "--user", "root"]
        subprocess.run(command, env=env, timeout=60, capture_output=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            queue = subprocess.run(
                ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=60
            )
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
        subprocess.run(["scontrol", "shutdown"], env=env, timeout=60, capture_output=True)
        for name in ("slurmctld", "slurmd", "munged"):
            _stop_by_pid_file(self.folder / f"{name}.pid")


def _stop_by_pid_file(pid_file: Path, timeout_s: float = 20.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (15, 9):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def start_local_slurm(folder: Path, timeout_s: float = 60.0) -> LocalSlurm:
    """Start munged, slurmctld and slurmd for a one-node cluster of this machine."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)  # munged wants its socket's folder searchable by everyone
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    node = socket.gethostname().split(".")[0]
    key = folder / "munge.key"
    subprocess.run(["mungekey", "--create", "--force", "--keyfile", str(key)], check=True)
    key.chmod(0o600)
    socket_path = folder / "munge.sock"
    subprocess.run(
        [
            "munged",
            "--force",
            f"--key-file={key}",
            f"--socket={socket_path}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}",
        ],
        check=True,
    )
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    conf = f"""\
ClusterName=scratchpath-tests
SlurmctldHost={node}(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket={socket_path},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MailProg=/bin/true
KillWait=30
OverTimeLimit=0
MinJobAge=3600
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb // 2} State=UNKNOWN
PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    (folder / "slurm.conf").write_text(conf)
    cluster = LocalSlurm(folder, node)
    env = cluster.env()
    subprocess.run(["slurmctld", "-f", str(cluster.conf), "-c"], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(cluster.conf)], env=env, check=True)
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30
        )
        if re.search(r"\bidle\b", result.stdout):
            return cluster
        if time.monotonic() > deadline:
            cluster.stop()
            logs = "".join(
                (folder / name).read_text()[-1500:]
                for name in ("slurmctld.log", "slurmd.log")
                if (folder / name).exists()
            )
            raise RuntimeError(f"local SLURM cluster did not come up: {result.stderr} {logs}")
        time.sleep(0.5)


class PacedSteps(Callback):
    """Makes each training step last at least ``seconds`` (a sleep after it), so that a job
    is still running when SLURM's time-limit warning comes, however fast the machine: the signal
    comes 10-40 s after the job starts, and 150 unpaced smoke steps took under 20 s on CI's
    machine. Sleeping changes no weight; jobs import it with the tests folder on PYTHONPATH."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)
