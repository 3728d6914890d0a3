"""A real Slurm cluster on this machine for the tests: Debian's slurmctld, two slurmd as virtual nodes n1 and n2
(same host, own ports and spool), munge for authentication. Needs root; installs the packages if missing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("n1", "n2")
CPUS_PER_NODE = 8  # claimed (config_overrides), so two 2-node jobs run side by side on a small machine

CONF = """\
ClusterName=biodino-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
KillWait=5
SchedulerParameters=bf_interval=1,sched_interval=1
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


def cannot_run_reason() -> str | None:
    """Why the cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def _install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True)


def _start_munge() -> None:
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


def _resolve_nodes() -> None:
    """n1 and n2 must resolve (MASTER_ADDR is the allocation's first node name)."""
    try:
        for node in NODES:
            socket.gethostbyname(node)
    except socket.gaierror:
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(NODES)}\n")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalSlurm:
    """Started by ``start()``, stopped by ``stop()``; ``env`` points clients (sbatch, scontrol) at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "LocalSlurm":
        _install()
        _start_munge()
        _resolve_nodes()
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
                          "State=UNKNOWN" for n, p in zip(NODES, node_ports))
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(root=self.root, ctld_port=ctld_port, nodes=nodes, node_list=",".join(NODES)))
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for n in NODES:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", n], check=True, env=self.env)
        self._wait_idle()
        return self

    def _wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s:\n{out}\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id, "-o")
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, states: tuple[str, ...] = ("COMPLETED",), timeout: float = 400) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                raise RuntimeError(f"job {job_id} ended {info['JobState']}: {info}")
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        self.run("scancel", "--user=root", check=False)
        for pid_file in self.root.glob("*.pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass
