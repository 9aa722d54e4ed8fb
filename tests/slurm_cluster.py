"""A real single-node SLURM cluster for tests (Debian slurm-wlm + munge, run as root).

``make system-deps`` installs the packages; this module writes a minimal
slurm.conf under a temporary folder, starts munged, slurmctld and slurmd, and
waits until the node is idle. Commands find the cluster through ``SLURM_CONF``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def unavailable_reason() -> str | None:
    missing = [b for b in BINARIES if not (shutil.which(b) or os.path.exists(f"/usr/sbin/{b}"))]
    if missing:
        return (f"SLURM is not installed here (missing {', '.join(missing)}; "
                "`make system-deps` installs slurm-wlm and munge as root)")
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return None


def _which(b: str) -> str:
    return shutil.which(b) or f"/usr/sbin/{b}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.munged_pid: int | None = None   # set only when this cluster started munged
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=streamloc-test
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
MaxArraySize=1001
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _ensure_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        pidfile = Path("/run/munge/munged.pid")
        deadline = time.time() + 10
        while not pidfile.exists() and time.time() < deadline:
            time.sleep(0.1)
        if pidfile.exists():
            self.munged_pid = int(pidfile.read_text().split()[0])

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_conf()
        self._ensure_munge()
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(subprocess.Popen(
                [_which(daemon), "-D", "-f", str(self.conf)], env=self.env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                 text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"SLURM did not come up:\n{logs}")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()
        if self.munged_pid is not None:   # stop the munged we started, by its PID
            try:
                os.kill(self.munged_pid, 15)
            except ProcessLookupError:
                pass
            self.munged_pid = None

    def submit(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
        """Submit without waiting; returns the job id (for ``--dependency=afterok:ID``)."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """Submit and wait (``--wait``): returns when every task has ended."""
        return subprocess.run(["sbatch", "--wait", *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)


def job_state(cluster: SlurmCluster, job: str) -> dict[str, str]:
    """``scontrol show job``'s ``Key=Value`` fields (JobState, Restarts, ExitCode...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster.env,
                         capture_output=True, text=True, timeout=30).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def signal_batch_shell(cluster: SlurmCluster, job: str, sig: str) -> None:
    """What ``--signal=B:SIG@...`` does before the time limit: signal the batch shell only."""
    subprocess.run(["scancel", "--batch", f"--signal={sig}", job], env=cluster.env,
                   check=True, capture_output=True, timeout=30)
