"""The workflow on SLURM: the cluster profiles, and real submissions to a one-node cluster on this machine.

The ci and extended tests start their own SLURM: slurm-wlm and munge from Debian (installed by
``.ci/install-slurm``, which .ci/run calls; a test fails without them), a private munged and a slurm.conf in a temporary folder (SLURM_CONF; /etc is left alone),
slurmctld and slurmd on free ports, the node with one placeholder GPU (gres ``gpu:1`` on /dev/null) so
that GPU requests are scheduled and visible. Then the demo runs through ``workflow/profiles/slurm`` up to
the soft-label cache (every job an sbatch job), one GPU job is submitted, and one job goes through
``workflow/profiles/slurm-generic``. Teardown cancels the cluster's jobs and stops exactly the daemons it
started, by PID. Needs root (munged runs as user munge).
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from workflow_runs import BIN, TINY, env, job_counts, workdir

#: The workflow's jobs get a little of the machine: mem_mb and runtime (minutes) differ per rule, so
#: each job's SLURM record shows its own rule's resources block.
THREADS = min(2, os.cpu_count() or 1)
CLUSTER_CONFIG = {
    **TINY,
    "resources": {
        "plan_preprocess": {"threads": 1, "mem_mb": 1100, "runtime": 20},
        "train_teacher": {"threads": THREADS, "mem_mb": 1200, "runtime": 30},
        "softlabels": {"threads": 1, "mem_mb": 1300, "runtime": 15},
    },
}
SOFTLABEL_JOBS = {"demo_data", "plan_preprocess", "train_teacher", "teacher_manifest", "softlabels_shard",
                  "softlabels_finalize", "softlabels_preview"}
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 420
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def read(cmd, cluster_env, timeout=30, check=True) -> str:
    run = subprocess.run(cmd, env=cluster_env, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run.stdout


def slurm_installed():
    """slurmctld, slurmd and munged on PATH (.ci/install-slurm installs them); a test fails without them."""
    missing = [name for name in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(name, path=SBIN_PATH)]
    if missing:
        pytest.fail(f"SLURM is not installed ({', '.join(missing)} not found): run `bash .ci/install-slurm` as root "
                    "first (.ci/run does)")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:  # all bound at once: n different ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def real_memory_mb() -> int:
    """MemTotal minus a margin for the system (slurmd drains a node that has less than RealMemory)."""
    kb = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    return kb // 1024 - max(512, kb // 1024 // 10)


def slurm_conf(root: Path, host: str, munge_socket: Path) -> str:
    ctld_port, slurmd_port = free_ports(2)  # beside any other SLURM on this machine
    return f"""\
ClusterName=fastkdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={real_memory_mb()} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """A running one-node SLURM: ``env`` reaches it (SLURM_CONF), ``job(id)`` is ``scontrol show job``."""

    def __init__(self, root: Path, host: str, cluster_env: dict):
        self.root, self.host, self.env = root, host, cluster_env

    def job(self, job_id: str) -> dict[str, str]:
        text = read(["scontrol", "show", "job", "-o", job_id], self.env)
        return dict(re.findall(r"(\S+?)=(\S*)", text))

    def cancel_all(self):
        ids = read(["squeue", "-h", "-o", "%i"], self.env, check=False).split()
        if ids:
            read(["scancel", *ids], self.env, check=False)
            deadline = time.monotonic() + 30
            while read(["squeue", "-h", "-o", "%i"], self.env, check=False).split() and time.monotonic() < deadline:
                time.sleep(1)


def wait_for(what: str, ready, daemons: list, logs: list[Path]):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
            pytest.fail(f"SLURM test cluster: {what} {'(' + ', '.join(dead) + ' exited)' if dead else 'timed out'}"
                        f"\n{tails}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node SLURM cluster on this machine for the whole session; stops exactly what it started."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start munged (as user munge) and slurmd: run them as root")
    slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="fastkd-slurm-"))
    root.chmod(0o755)  # munged (user munge) reaches its socket below
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, timeout=600).stdout.strip() or socket.gethostname()
    munge = root / "munge"
    munge.mkdir()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    shutil.chown(munge, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, munge / "munge.socket"))
    (root / "gres.conf").write_text(f"NodeName={host} Name=gpu Count=1 File=/dev/null\n")
    # The SLURM plugin's job step drops every SLURM_* variable, SLURM_CONF too, before it calls srun in the
    # job: this srun puts it back (a real cluster's slurm.conf is where srun looks by default).
    (root / "bin").mkdir()
    srun = root / "bin" / "srun"
    srun.write_text(f"#!/bin/sh\nSLURM_CONF={conf} exec {shutil.which('srun', path=SBIN_PATH)} \"$@\"\n")
    srun.chmod(0o755)
    cluster_env = {k: v for k, v in env().items() if not k.startswith("SLURM")}
    cluster_env["SLURM_CONF"] = str(conf)
    cluster_env["PATH"] = os.pathsep.join([str(root / "bin"), cluster_env["PATH"], "/usr/sbin", "/sbin"])
    logs = [root / "munged.out", root / "slurmctld.log", root / "slurmd.log", root / "slurmctld.out", root / "slurmd.out"]
    daemons = []

    def start(cmd, out, **kwargs):
        with open(out, "w") as f:
            daemons.append(subprocess.Popen(cmd, env=cluster_env, stdout=f, stderr=subprocess.STDOUT, cwd=root, **kwargs))

    try:
        start(["munged", "--foreground", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
               f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
               f"--log-file={munge / 'munged.log'}"], root / "munged.out",
              user="munge", group="munge", extra_groups=[])
        wait_for("munged", lambda: (munge / "munge.socket").exists(), daemons, logs)
        start(["slurmctld", "-D", "-f", str(conf)], root / "slurmctld.out")
        start(["slurmd", "-D", "-f", str(conf), "-N", host], root / "slurmd.out")
        wait_for("node idle in sinfo", lambda: read(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], cluster_env,
                                                     check=False).strip() == "idle", daemons, logs)
        cluster = Cluster(root, host, cluster_env)
        yield cluster
    finally:
        if daemons[1:]:
            try:  # jobs still running (a timed-out run): their slurmstepd would outlive slurmd
                Cluster(root, host, cluster_env).cancel_all()
            except subprocess.TimeoutExpired:
                pass
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def cluster_snakemake(cluster: Cluster, wd: Path, profile: str, *args) -> subprocess.CompletedProcess:
    """``snakemake --workflow-profile workflow/profiles/<profile>``, as a user runs it, bounded in time."""
    cmd = [str(BIN / "snakemake"), "--workflow-profile", f"workflow/profiles/{profile}", *args,
           "--configfile", "test.yaml"]
    try:
        return subprocess.run(cmd, cwd=wd, env=cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran over {RUN_TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")


@pytest.fixture(scope="module")
def slurm_softlabels(slurm_cluster, tmp_path_factory):
    """``snakemake --workflow-profile workflow/profiles/slurm softlabels`` on the demo: preprocessing,
    one tiny teacher fold, its manifest, the soft-label shards, the cache's root and preview."""
    wd = workdir(tmp_path_factory.mktemp("slurm"), CLUSTER_CONFIG)
    run = cluster_snakemake(slurm_cluster, wd, "slurm", "softlabels", "--slurm-keep-successful-logs")
    assert run.returncode == 0, run.stdout + run.stderr
    return wd, run


def submissions(run: subprocess.CompletedProcess) -> list[tuple[str, str, Path]]:
    """(rule, SLURM job id, SLURM log) of every job the plugin submitted, from its log lines."""
    found = []
    for job_id, log in SUBMITTED.findall(run.stdout + run.stderr):
        rule = next(part for part in Path(log).parts if part.startswith("rule_"))[len("rule_"):]
        found.append((rule, job_id, Path(log)))
    return found


@pytest.mark.ci
def test_every_job_runs_as_a_slurm_job_and_succeeds(slurm_cluster, slurm_softlabels):
    wd, run = slurm_softlabels
    jobs = submissions(run)
    counts = job_counts(run.stdout + run.stderr)
    assert set(counts) == SOFTLABEL_JOBS | {"softlabels"}
    assert sorted(rule for rule, _, _ in jobs) == sorted(r for r, n in counts.items() for _ in range(n)
                                                         if r != "softlabels")  # the target rule runs nothing
    assert len({job_id for _, job_id, _ in jobs}) == len(jobs)
    for rule, job_id, log in jobs:
        record = slurm_cluster.job(job_id)
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), (rule, record)
        assert record["WorkDir"] == str(wd)
        assert log.is_file() and log.is_relative_to(wd / ".snakemake" / "slurm_logs"), log


@pytest.mark.ci
def test_jobs_ask_slurm_for_their_rules_resources(slurm_cluster, slurm_softlabels):
    """threads, mem_mb and runtime of the config's resources: block reach sbatch; CPU jobs ask for no GPU;
    the soft-label shards are separate SLURM jobs, so a cluster spreads them over its nodes."""
    _, run = slurm_softlabels
    records = {}
    for rule, job_id, _ in submissions(run):
        records.setdefault(rule, []).append(slurm_cluster.job(job_id))
    for rule, key in (("plan_preprocess", "plan_preprocess"), ("train_teacher", "train_teacher"),
                      ("softlabels_shard", "softlabels")):
        wanted = CLUSTER_CONFIG["resources"][key]
        for record in records[rule]:
            assert record["NumCPUs"] == str(wanted["threads"]), (rule, record)
            assert record["MinMemoryNode"] == f"{wanted['mem_mb']}M", (rule, record)
            assert record["TimeLimit"] == f"00:{wanted['runtime']:02d}:00", (rule, record)
    assert len(records["softlabels_shard"]) == 2  # softlabels.shards in config.yaml
    assert all("gpu" not in record.get("TresPerJob", "") for rs in records.values() for record in rs)


@pytest.mark.ci
def test_cache_written_through_slurm_verifies(slurm_softlabels):
    wd, _ = slurm_softlabels
    stores = list(wd.glob("fastkd_work/*/softlabels/*.zarr"))
    assert len(stores) == 1 and (stores[0] / "zarr.json").is_file(), stores
    verify = subprocess.run([str(BIN / "fastkd"), "cache", "verify", str(stores[0])], cwd=wd, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.ci
def test_gpu_jobs_ask_slurm_for_gpus(slurm_cluster, slurm_softlabels, tmp_path):
    """softlabels.device: cuda -> the shard job is submitted with --gpus=1 (the placeholder GPU lets SLURM
    schedule it; without a real GPU the job itself then fails, which is not what this checks)."""
    wd = tmp_path / "gpu"
    shutil.copytree(slurm_softlabels[0], wd, symlinks=True)
    config = yaml.safe_load((wd / "test.yaml").read_text())
    config["softlabels"] = {"device": "cuda"}
    (wd / "test.yaml").write_text(yaml.safe_dump(config))
    shard = next(wd.glob("fastkd_work/*/softlabels/*.shards/shard-1-of-*.json")).relative_to(wd)
    # first status check after 1 s: the job fails in seconds here, and a later check only waits longer
    run = cluster_snakemake(slurm_cluster, wd, "slurm", str(shard), "--slurm-init-seconds-before-status-checks", "1")
    jobs = submissions(run)
    assert [rule for rule, _, _ in jobs] == ["softlabels_shard"], run.stdout + run.stderr
    record = slurm_cluster.job(jobs[0][1])
    assert record["TresPerJob"] == "gres:gpu:1", record
    # SLURM scheduled it on the placeholder GPU and ran it; fastkd then refused: this machine has no CUDA
    assert record["JobState"] == "FAILED", record
    logs = [jobs[0][2], *(wd / "fastkd_work" / "logs").rglob("*")]
    said = "\n".join(p.read_text(errors="replace") for p in logs if p.is_file())
    assert "softlabels.device = 'cuda' but torch sees no CUDA GPU" in said, said[-3000:]


@pytest.mark.extended
def test_killed_controller_restarted_ends_with_a_verified_cache(slurm_cluster, slurm_softlabels, tmp_path):
    """The controller is SIGKILLed while a soft-label shard runs as a SLURM job (which SLURM keeps running:
    killing Snakemake cancels nothing); after ``--unlock`` the restarted controller (``--rerun-incomplete``)
    resubmits what is unfinished, the orphaned job and the new ones write the same store side by side, and
    the store ends complete and verified, also after the orphan has finished."""
    import signal

    wd = tmp_path / "killed"
    shutil.copytree(slurm_softlabels[0], wd, symlinks=True)
    config = yaml.safe_load((wd / "test.yaml").read_text())
    config.setdefault("distillation", {})["temperature"] = 2.0  # a new store: only the soft labels rerun
    (wd / "test.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(BIN / "snakemake"), "--workflow-profile", "workflow/profiles/slurm", "softlabels",
           "--configfile", "test.yaml"]
    log = tmp_path / "controller.log"
    with open(log, "w") as out:
        controller = subprocess.Popen(cmd, cwd=wd, env=slurm_cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
    orphan, deadline = None, time.monotonic() + RUN_TIMEOUT_S
    try:
        while orphan is None:
            assert controller.poll() is None, f"the controller ended before a shard ran:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no shard job running in time:\n{log.read_text()}"
            for job_id, slurm_log in SUBMITTED.findall(log.read_text()):
                if "rule_softlabels_shard" in slurm_log and slurm_cluster.job(job_id)["JobState"] == "RUNNING":
                    orphan = job_id
                    break
            time.sleep(0.5)
    finally:
        os.killpg(controller.pid, signal.SIGKILL)
        controller.wait()
    assert slurm_cluster.job(orphan)["JobState"] in ("RUNNING", "COMPLETED"), slurm_cluster.job(orphan)
    stores = lambda: list(wd.glob("fastkd_work/*/softlabels/*T2*.zarr"))  # noqa: E731
    assert not any((store / "zarr.json").is_file() for store in stores())  # unfinished: its root comes last

    def verify():
        [store] = stores()
        return subprocess.run([str(BIN / "fastkd"), "cache", "verify", str(store)], cwd=wd, env=env(),
                              capture_output=True, text=True, timeout=120)

    locked = cluster_snakemake(slurm_cluster, wd, "slurm", "softlabels")
    assert locked.returncode != 0 and "LockException" in locked.stdout + locked.stderr
    assert cluster_snakemake(slurm_cluster, wd, "slurm", "--unlock").returncode == 0
    rerun = cluster_snakemake(slurm_cluster, wd, "slurm", "softlabels", "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    result = verify()
    assert result.returncode == 0, result.stdout + result.stderr
    deadline = time.monotonic() + 120  # the orphan may still be writing: the store must stay complete
    while slurm_cluster.job(orphan)["JobState"] in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, slurm_cluster.job(orphan)
        time.sleep(1)
    result = verify()
    assert result.returncode == 0, result.stdout + result.stderr
    again = cluster_snakemake(slurm_cluster, wd, "slurm", "softlabels", "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr


@pytest.mark.ci
def test_generic_cluster_profile_submits_with_sbatch(slurm_cluster, tmp_path):
    """workflow/profiles/slurm-generic: sbatch --parsable to submit, status.sh (scontrol) to follow."""
    wd = workdir(tmp_path, CLUSTER_CONFIG)
    run = cluster_snakemake(slurm_cluster, wd, "slurm-generic", "demo_data")
    assert run.returncode == 0, run.stdout + run.stderr
    job_ids = re.findall(r"Submitted job \d+ with external jobid '(\d+)'", run.stdout + run.stderr)
    assert len(job_ids) == 1, run.stdout + run.stderr
    record = slurm_cluster.job(job_ids[0])
    assert (record["JobState"], record["ExitCode"], record["JobName"]) == ("COMPLETED", "0:0", "fastkd-demo_data")
    assert (wd / ".snakemake" / "slurm_logs" / f"demo_data-{job_ids[0]}.log").is_file()
    assert list(wd.glob("nnUNet_raw/*/dataset.json"))


#: rule -> the config key whose device (or GPU count) decides its gpu resource
GPU_RULES = {"train_teacher": 1, "softlabels_shard": 1, "train_student": 2, "train_baseline": 2,
             "predict_teachers": 1, "predict_student": 1, "export_trt": 1}
CUDA_CONFIG = {"teachers": {"device": "cuda"}, "softlabels": {"device": "cuda"},
               "student": {"device": "cuda", "num_gpus": 2}, "evaluation": {"device": "cuda"},
               "export": {"tensorrt": {"enabled": True}}}


def dry_run_gpus(wd: Path, profile: str) -> dict[str, set[int]]:
    """rule -> the gpu resource of its jobs, from ``snakemake --workflow-profile ... -n`` (no cluster needed)."""
    run = subprocess.run([str(BIN / "snakemake"), "--workflow-profile", f"workflow/profiles/{profile}", "-n",
                          "--configfile", "test.yaml"], cwd=wd, env=env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    gpus = {}
    for rule, block in re.findall(r"^rule (\w+):\n(.*?)(?=^\S)", run.stdout, re.M | re.S):
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        gpu = re.search(r"\bgpu=(\d+)", resources.group(1)) if resources else None
        gpus.setdefault(rule, set()).add(int(gpu.group(1)) if gpu else 0)
    return gpus


@pytest.mark.parametrize("profile", ["slurm", "slurm-generic"])
def test_profiles_load_and_gpu_rules_ask_for_gpus(profile, tmp_path):
    """Both cluster profiles parse with the installed Snakemake and executor plugins; on device cuda the
    networks' rules ask for GPUs (the plugin's --gpus), every other rule for none; on cpu none does."""
    cuda = dry_run_gpus(workdir(tmp_path, CUDA_CONFIG, name="cuda"), profile)
    assert set(GPU_RULES) <= set(cuda)
    assert {rule: gpus for rule, gpus in cuda.items() if gpus != {0}} == {r: {n} for r, n in GPU_RULES.items()}
    cpu = dry_run_gpus(workdir(tmp_path, name="cpu"), profile)
    assert "train_teacher" in cpu and all(gpus == {0} for gpus in cpu.values()), cpu
