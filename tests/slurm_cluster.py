"""A real single-node SLURM for the tests: Debian's slurmctld, slurmd and munge, installed when
missing, configured under a temporary directory and started as root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]


def install() -> str:
    """'' when SLURM is ready to start, else why it cannot be."""
    if all(shutil.which(b) for b in BINARIES):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install_cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install_cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip().splitlines()[-1:]}"
    return ""


def _conf(root: Path) -> str:
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=megatron-power-test",
        f"SlurmctldHost={host}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CryptoType=crypto/munge",
        # A requeued job may start again after the credential lifetime (default 120 s).
        "AuthInfo=cred_expire=5",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill", "MpiDefault=none", "ReturnToService=2",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobRequeue=1", "MinJobAge=600", "KillWait=30",
        node.split(" UpTime")[0] + " State=UNKNOWN",
        f"PartitionName=debug Nodes={node.split()[0].split('=')[1]} Default=YES MaxTime=INFINITE State=UP "
        "OverSubscribe=NO",
        "",
    ])


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.daemons = []

    def start(self) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(self.root))
        socket_dir = Path("/run/munge")
        socket_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(socket_dir, "munge", "munge")
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        for daemon in ("slurmctld", "slurmd"):
            self.daemons.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=self.env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return
            time.sleep(1)
        raise RuntimeError(f"SLURM did not come up: sinfo says {out.strip()!r}; see {self.root}/*.log")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        time.sleep(2)
        for p in self.daemons:
            p.terminate()
        for p in self.daemons:
            p.wait(timeout=30)

    def job(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_for_text(self, path: Path, text: str, timeout: float) -> None:
        """Until a job's output file holds `text`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.is_file() and text in path.read_text():
                return
            time.sleep(1)
        raise TimeoutError(f"{path} has no '{text}' after {timeout} s")

    def wait(self, job_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(2)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")
