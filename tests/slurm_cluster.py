"""A real one-node Slurm cluster for the tests (Debian's ``slurm-wlm`` and ``munge``).

``start_cluster(workdir)`` writes a slurm.conf for this machine under ``workdir`` (state, spool,
logs and pid files all live there; the controller and node ports are picked free, so a
leftover daemon of an earlier run cannot clash), starts ``munged`` as the ``munge`` user when
it is not already running, starts ``slurmctld`` and ``slurmd`` in the foreground as children of
this process and waits until ``sinfo`` shows the node idle. ``Cluster.stop()`` cancels the jobs
of this cluster and ends only the processes it started (``munged`` stays up when it was already
running before, and always under ``pytest -n N``, whose workers each start a cluster of their
own on the one ``munged``).

Clients (``sbatch``, ``squeue``, ``scontrol``, submitit) find the cluster through ``SLURM_CONF``:
``start_cluster`` sets it in ``os.environ`` (restored by ``stop()``); ``Cluster.env()`` gives an
environment for subprocesses. sbatch exports the submitter's environment to the job
(``--export=ALL``), so jobs see it too.

No ``slurmdbd`` runs, so the real ``sacct`` has nothing to answer with ("accounting storage is
disabled"), and submitit polls ``sacct`` for a job's state: a job that died without writing its
result (killed, out of memory, cancelled) would then look UNKNOWN, i.e. unfinished, for ever.
The cluster therefore puts a small ``sacct`` in front of the real one on ``PATH``
(``<workdir>/bin/sacct``) that answers submitit's query
(``sacct -o JobID,State,NodeList --parsable2 -j ID ...``) from ``squeue`` (jobs the controller
still holds) and the job-completion log (``JobCompType=jobcomp/filetxt``, for jobs it purged).

Needs root (``SlurmUser=root``, ``munged`` started via ``runuser``). Runs on Debian 12's Slurm
22.05 with ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SBIN = Path("/usr/sbin")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_SOCKET = MUNGE_RUN / "munge.socket.2"
MUNGE_PIDFILE = MUNGE_RUN / "munged.pid"
PARTITION = "debug"
START_TIMEOUT_S = 30.0


class ClusterError(RuntimeError):
    """The cluster could not be started (the message carries the daemons' logs)."""


def slurm_installed() -> bool:
    return all((SBIN / name).is_file() or shutil.which(name)
               for name in ("slurmctld", "slurmd", "munged")) and shutil.which("sbatch") is not None


def _sbin(name: str) -> str:
    path = SBIN / name
    return str(path) if path.is_file() else (shutil.which(name) or name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("no MemTotal in /proc/meminfo")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"--- {path}: (missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines):\n" + "\n".join(text)


# --- munge ---------------------------------------------------------------------------------

def munge_works() -> bool:
    """Whether a munged answers on the default socket (encode + decode round trip)."""
    if not shutil.which("munge") or not shutil.which("unmunge"):
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        back = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5)
        return back.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ensure_munge_key() -> None:
    if MUNGE_KEY.is_file():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("mungekey") or (SBIN / "mungekey").is_file():
        subprocess.run([_sbin("mungekey"), "--create", "--keyfile", str(MUNGE_KEY)], check=True)
    else:
        MUNGE_KEY.write_bytes(os.urandom(128))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    shutil.chown(MUNGE_KEY.parent, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    MUNGE_KEY.parent.chmod(0o700)


def _start_munged(log: Path) -> int:
    """Start munged as the munge user; returns its pid (munged daemonizes itself)."""
    _ensure_munge_key()
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)
    for sub in (Path("/var/lib/munge"), Path("/var/log/munge")):
        if not sub.is_dir():
            sub.mkdir(parents=True)
            shutil.chown(sub, "munge", "munge")
            sub.chmod(0o700)
    # --force: start even over a stale socket left by a munged that was killed
    cmd = [_sbin("munged"), "--force"]
    if shutil.which("runuser"):
        cmd = ["runuser", "-u", "munge", "--"] + cmd
    else:
        cmd = ["sudo", "-u", "munge"] + cmd
    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if munge_works() and MUNGE_PIDFILE.is_file():
            return int(MUNGE_PIDFILE.read_text().split()[0])
        time.sleep(0.1)
    raise ClusterError(f"munged did not start (exit status {done.returncode})\n{_tail(log)}\n"
                       f"{_tail(Path('/var/log/munge/munged.log'))}")


# --- the sacct stand-in ----------------------------------------------------------------------

SACCT_SHIM = '''#!{python}
"""sacct for a cluster without slurmdbd (tests/slurm_cluster.py): answers
``sacct -o FIELDS --parsable2 -j ID [-j ID ...]`` from squeue and the job-completion log."""
import re, subprocess, sys

JOBCOMP = {jobcomp!r}
args = sys.argv[1:]
fields, ids, i = ["JobID", "State", "NodeList"], [], 0
while i < len(args):
    a = args[i]
    if a in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(","); i += 2; continue
    if a.startswith("--format="):
        fields = a.split("=", 1)[1].split(","); i += 1; continue
    if a in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(","); i += 2; continue
    if a.startswith("--jobs="):
        ids += a.split("=", 1)[1].split(","); i += 1; continue
    i += 1
rows = {{}}  # job id -> {{"JobID", "State", "NodeList"}}
try:
    for line in open(JOBCOMP):
        kv = dict(m.groups() for m in re.finditer(r"(\\w+)=(\\S*)", line))
        if "JobId" in kv:
            nodes = kv.get("NodeList", "")
            rows[kv["JobId"]] = {{"JobID": kv["JobId"], "State": kv.get("JobState", "UNKNOWN"),
                                 "NodeList": "None assigned" if nodes in ("", "(null)") else nodes}}
except FileNotFoundError:
    pass
out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%N|%A|%K"],
                     capture_output=True, text=True)
for line in out.stdout.splitlines():
    jid, state, nodes, base, task = (line.split("|") + ["", "", "", "", ""])[:5]
    rows[jid] = {{"JobID": jid, "State": state, "NodeList": nodes or "None assigned"}}
wanted = [r for jid, r in rows.items()
          if not ids or jid in ids or jid.split("_")[0] in ids]
print("|".join(fields))
for r in wanted:
    print("|".join(r.get(f, "") for f in fields))
'''


def _write_sacct_shim(bindir: Path, jobcomp: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    shim = bindir / "sacct"
    shim.write_text(SACCT_SHIM.format(python=sys.executable, jobcomp=str(jobcomp)))
    shim.chmod(0o755)


# --- the cluster -----------------------------------------------------------------------------

@dataclass
class Cluster:
    workdir: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    real_memory_mb: int
    controller_port: int
    node_port: int
    started_s: float = 0.0
    procs: list[subprocess.Popen] = field(default_factory=list)
    munged_pid: int | None = None  # only when this cluster started munged
    _env_before: dict[str, str | None] = field(default_factory=dict)

    @property
    def logs(self) -> list[Path]:
        return [self.workdir / "slurmctld.log", self.workdir / "slurmd.log",
                self.workdir / "slurmctld.out", self.workdir / "slurmd.out"]

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(_tail(p, lines) for p in self.logs)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for client commands and submitit (SLURM_CONF, the sacct stand-in)."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        bindir = str(self.workdir / "bin")
        if not env.get("PATH", "").startswith(bindir + os.pathsep):
            env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; returns its stdout."""
        done = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-N", "-n", self.node, "-o", "%T",
                            check=False, timeout=10).strip()
        except subprocess.TimeoutExpired:
            return ""

    def _apply_env(self) -> None:
        new = self.env()
        for key in ("SLURM_CONF", "PATH"):
            self._env_before[key] = os.environ.get(key)
            os.environ[key] = new[key]

    def _restore_env(self) -> None:
        for key, value in self._env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env_before = {}

    def stop(self) -> None:
        """Cancel this cluster's jobs, end the daemons it started, restore the environment."""
        alive = [p for p in self.procs if p.poll() is None]
        if len(alive) == len(self.procs) and alive:
            try:  # jobs run in slurmstepd processes that outlive slurmd: cancel them first
                self.run("scancel", "--partition", self.partition, check=False, timeout=10)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i",
                        check=False, timeout=10).strip():
                    time.sleep(0.2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for proc in reversed(self.procs):  # slurmd first, then slurmctld
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None
        self._restore_env()


def _slurm_conf(workdir: Path, node: str, cpus: int, mem_mb: int, ctld_port: int,
                node_port: int) -> str:
    w = workdir
    return f"""\
# one-node test cluster written by tests/slurm_cluster.py
ClusterName=handclip
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire+1 s before it may start again (default 120 s)
AuthInfo=cred_expire=5
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={w}/jobcomp.log
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU={max(256, mem_mb // max(cpus, 1))}
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerParameters=sched_interval=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(workdir: str | os.PathLike, timeout: float = START_TIMEOUT_S) -> Cluster:
    """Start munged (if needed), slurmctld and slurmd for a one-node cluster under workdir."""
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (SlurmUser=root; munged via runuser)")
    if not slurm_installed():
        raise ClusterError("Slurm is not installed: apt-get install slurm-wlm munge, "
                           "or run .ci/run")
    t0 = time.monotonic()
    workdir = Path(workdir).resolve()
    for sub in ("state", "spool", "bin"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                          check=True).stdout.strip()
    cpus = os.cpu_count() or 1
    try:
        cpus = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except (OSError, ValueError):
        pass
    mem_mb = max(512, int(_mem_total_mb() * 0.9))
    ctld_port, node_port = _free_ports(2)
    conf = workdir / "slurm.conf"
    conf.write_text(_slurm_conf(workdir, node, cpus, mem_mb, ctld_port, node_port))
    _write_sacct_shim(workdir / "bin", workdir / "jobcomp.log")
    cluster = Cluster(workdir=workdir, conf=conf, node=node, partition=PARTITION, cpus=cpus,
                      real_memory_mb=mem_mb, controller_port=ctld_port, node_port=node_port)
    try:
        # under pytest -n N every worker starts its own cluster (own ports, state and spool)
        # and they share the machine's one munged: the first starts it under a lock, and it
        # stays up after that worker's session, since another worker's cluster may still
        # authenticate through it
        from handclip_nb.locks import take_turn

        with take_turn(Path("/tmp/handclip-test-munged.lock"), "starting munged"):
            if not munge_works():
                pid = _start_munged(workdir / "munged.out")
                cluster.munged_pid = None if os.environ.get("PYTEST_XDIST_WORKER") else pid
        env = cluster.env()
        for name, args in (("slurmctld", ["-D", "-c", "-f", str(conf)]),
                           ("slurmd", ["-D", "-f", str(conf), "-N", node])):
            with (workdir / f"{name}.out").open("ab") as out:
                cluster.procs.append(subprocess.Popen(
                    [_sbin(name), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                    stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [p for p in cluster.procs if p.poll() is not None]
            if dead:
                raise ClusterError(f"{Path(dead[0].args[0]).name} exited with status "
                                   f"{dead[0].returncode}")
            state = cluster.node_state()
            if state == "idle":
                break
            time.sleep(0.25)
        else:
            raise ClusterError(f"node {node} not idle after {timeout:.0f} s "
                               f"(sinfo says {state!r})")
    except BaseException as exc:
        logs = cluster.log_tails()
        cluster.stop()
        if isinstance(exc, ClusterError):
            raise ClusterError(f"{exc}\n{logs}") from None
        raise
    cluster._apply_env()
    cluster.started_s = time.monotonic() - t0
    return cluster


if __name__ == "__main__":  # manual check: python tests/slurm_cluster.py /tmp/slurm-test
    import tempfile

    c = start_cluster(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-"))
    try:
        print(f"cluster up in {c.started_s:.1f} s: SLURM_CONF={c.conf}")
        print(c.run("sinfo"))
    finally:
        c.stop()
