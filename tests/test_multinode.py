"""Training across hosts, on a real multi-node Slurm (tests/multinode.py: hosts n1, n2 as network
namespaces joined by a private bridge, munge and slurmd on each, slurmctld on n1), with slurm/train.sh as a
user submits it: CPU nodes, gloo, one rank per node, over the hosts' own network.

- the same run on 2 nodes as with 2 ranks on one host, bit for bit;
- the time limit's USR1 on 2 nodes: one checkpoint, a requeue, a resume on both, bit for bit;
- a node lost mid-run: the job is requeued, and resumes from its last checkpoint when the node is back (what
  is lost: the steps since it), bit for bit;
- a hung node: the other rank ends within train.timeout_s, the job is requeued and resumes, bit for bit.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dist_resnet import rundir
from dist_resnet.checkpoint import load
from tests.conftest import RESUME, ROOT, TINY
from tests.launch import free_port
from tests.runs import assert_same_run, metrics
from tests.slurm import ended


@pytest.fixture(scope="module")
def nodes():
    from tests.multinode import cluster

    with cluster(2) as c:
        yield c


def submit(c, tmp_path: Path, tiny_betons: Path, name: str, *args: str) -> tuple[str, Path, Path]:
    """sbatch --nodes=2 slurm/train.sh on the CPU nodes (one rank each); the job, its output, its run folder."""
    # one thread per rank, as each of 2 ranks on one 2-core host has: oneDNN's kernels change with the thread
    # count, and so would the bits (one rank alone on a "node" would take both cores)
    env = {"CONFIG": TINY[1], "DATA_DIR": str(tiny_betons), "MASTER_PORT": str(free_port()),
           "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1"}
    job = c.sbatch(ROOT / "slurm" / "train.sh", *RESUME, *args, options=("--nodes=2", f"--job-name={name}"), env=env,
                   cwd=tmp_path)
    return job, tmp_path / f"slurm-{name}-{job}.out", tmp_path / "runs" / f"{name}-{job}"


def has(path: Path, text: str):
    return lambda: path.exists() and text in path.read_text(errors="replace")


@pytest.mark.slow  # the time-limit test below shows the same across hosts, with a requeue in between
def test_two_nodes_train_the_run_two_ranks_train_on_one_host(nodes, tiny_betons, reference_2rank, tmp_path):
    """One rank on each of n1 and n2, over their own network (gloo on eth0), against 2 ranks on one host:
    torch.equal for every weight, and the same history (the same world size, so the same global batch,
    order and all-reduce)."""
    job, out, run_dir = submit(nodes, tmp_path, tiny_betons, "across")
    rec = nodes.wait(job, ended, what="the end of the job")
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["NodeList"] == "n[1-2]", (rec, log)
    assert "2 node(s) x 1 process(es) (0 GPUs per node)" in log and "GLOO_SOCKET_IFNAME=eth0" in log, log
    assert_same_run(reference_2rank, run_dir)


def test_the_time_limit_on_two_nodes_checkpoints_requeues_and_resumes_on_both(nodes, tiny_betons, reference_2rank,
                                                                             tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@T sends): both ranks stop after the same step, one
    checkpoint is written, the job is requeued and resumes on both nodes, bit-identical to 2 ranks on one
    host (one rank on each of n1 and n2, gloo over their eth0: the same world size, global batch, order and
    all-reduce, and one thread per rank on either side)."""
    job, out, run_dir = submit(nodes, tmp_path, tiny_betons, "limit")
    nodes.await_file(job, has(out, "epoch   1 train loss"), "epoch 1")
    nodes.run("scancel", "-s", "USR1", "-b", job)
    nodes.requeued(job)
    rec = nodes.wait(job, ended, what="the end of the requeued job")
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1" and rec["NodeList"] == "n[1-2]", (rec, log)
    assert log.count("stopped (") >= 1 and "resumed from" in log and "(restart 1): 2 node(s)" in log, log
    assert "2 node(s) x 1 process(es) (0 GPUs per node)" in log and "GLOO_SOCKET_IFNAME=eth0" in log, log
    assert_same_run(reference_2rank, run_dir)


def test_a_node_lost_mid_run_is_requeued_and_resumes_when_the_node_is_back(nodes, tiny_betons, reference_2rank,
                                                                           tmp_path):
    """n2 dies in epoch 2 (its slurmd, munged and rank SIGKILLed). The rank on n1 fails at its next
    collective; Slurm declares n2 failed (SlurmdTimeout) and requeues the --requeue job itself; the STOP that
    its TERM makes the script write, after the trainer is gone, is withdrawn when the job starts again. The
    job waits for 2 nodes; n2 comes back, and the job resumes on both from the last checkpoint, to the bits
    of an uninterrupted run. What is lost: the steps since that checkpoint."""
    job, out, run_dir = submit(nodes, tmp_path, tiny_betons, "lost")
    nodes.await_file(job, has(out, "epoch   1 train loss"), "epoch 1")
    t0 = time.time()
    nodes.crash("n2")
    try:
        nodes.wait(job, lambda r: r.get("Restarts") == "1" and r.get("JobState") == "PENDING", 120,
                   "PENDING after the node failure")
        requeued = time.time() - t0
        saved = load(run_dir / "last.pt")["step"]  # the resume point: no rank is left to write another
        assert (run_dir / "STOP").exists()  # written by the TERM trap after the trainer was gone: stale
        # the lost node comes back once Slurm has closed the job's old step on it (a slurmd that returns while
        # its node is still COMPLETING leaves the requeued job's srun waiting for "busy" nodes)
        nodes.until(lambda: "COMPLETING" not in nodes.node_state("n2") and "DOWN" in nodes.node_state("n2"), 60,
                    "n2 down, the lost step closed")
        time.sleep(2)
    finally:
        nodes.revive("n2")
    nodes.until(lambda: "IDLE" in nodes.node_state("n2"), 60, "n2 back")
    nodes.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    rec = nodes.wait(job, ended, what="the end of the requeued job")
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1" and rec["NodeList"] == "n[1-2]", (rec, log)
    # the rank on n1 fails at once, but srun waits for n2's task until Slurm declares n2 failed, then the step
    # is cancelled and Slurm requeues the job; where srun returns first, the script requeues it
    assert "DUE TO NODE FAILURE" in log or "failure requeue 1 of 3" in log, log
    assert f"global step {saved})" in log and not (run_dir / "STOP").exists(), log
    print(f"node lost: requeued {requeued:.1f} s after the crash; resumed from global step {saved}")
    assert_same_run(reference_2rank, run_dir)


@pytest.mark.slow  # 2 minutes: the step ends on the hung node only after torchrun's and srun's kill grace
def test_a_hung_node_ends_the_other_rank_in_its_timeout_and_the_job_resumes(nodes, tiny_betons, reference_2rank,
                                                                           tmp_path):
    """SIGSTOP n2's rank: n1's rank gives up after train.timeout_s (10 s) with a message that says so, the
    step ends on both nodes (srun --kill-on-bad-exit; SIGKILL reaches a stopped process), the script requeues
    the job, and it resumes on both nodes to the bits of an uninterrupted run."""
    job, out, run_dir = submit(nodes, tmp_path, tiny_betons, "hung", "train.timeout_s=10")
    nodes.await_file(job, has(out, "epoch   1 train loss"), "epoch 1")
    ranks = [p for p in nodes.hosts["n2"].pids() if b"dist_resnet.train" in Path(f"/proc/{p}/cmdline").read_bytes()
             and b"torchrun" not in Path(f"/proc/{p}/cmdline").read_bytes()
             and b"srun" not in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert ranks, "no rank found on n2"
    t0 = time.time()
    for pid in ranks:
        os.kill(pid, signal.SIGSTOP)
    nodes.await_file(job, has(out, "Another rank died or hangs"), "the other rank's timeout", 60)
    told = time.time() - t0
    nodes.wait(job, lambda r: r.get("Restarts") == "1" and r.get("JobState") == "PENDING", 180,
               "PENDING after the failure requeue")
    waited = time.time() - t0
    nodes.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    rec = nodes.wait(job, ended, what="the end of the requeued job")
    log = out.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", (rec, log)
    assert "Another rank died or hangs" in log and "failure requeue 1 of 3" in log, log
    # the requeue waits for the step to end on n2 too: torchrun's agent there gives its stopped worker a grace
    # period after SIGTERM, and srun SIGKILLs after KillWait
    print(f"hung rank: n1's rank said so {told:.1f} s after the SIGSTOP (train.timeout_s=10), the job was "
          f"requeued after {waited:.1f} s")
    assert told < 10 + 15
    assert_same_run(reference_2rank, run_dir)


def elastic_agent(nodes, host: str, tmp_path: Path, tiny_betons: Path, run_dir: Path, port: int):
    """launch/multi_node.sh in its elastic mode on `host`: 1 to 2 nodes, 3 restarts, c10d on n1."""
    env = {"MASTER_ADDR": "n1", "MASTER_PORT": str(port), "NNODES": "1:2", "MAX_RESTARTS": "3", "NPROC": "1",
           "RUN_DIR": str(run_dir), "DATA_DIR": str(tiny_betons), "CONFIG": TINY[1], "OMP_NUM_THREADS": "1",
           "RDZV_CONF": "last_call_timeout=2", "GLOO_SOCKET_IFNAME": "eth0"}
    return nodes.popen(host, ["bash", str(ROOT / "launch" / "multi_node.sh"), *TINY[2:], "train.epochs=30",
                              "train.checkpoint_every=5", "train.timeout_s=30"], tmp_path / f"{host}.log", env, ROOT)


@pytest.mark.slow  # a minute: 30 epochs, so that the rejoin falls inside the run
def test_elastic_torchrun_goes_on_after_a_node_crash_and_takes_back_a_node_that_rejoins(nodes, tiny_betons, tmp_path):
    """Without Slurm: an agent on n1 and one on n2 (NNODES=1:2). n2 crashes (its agent and worker SIGKILLed):
    n1's agent restarts its worker, which resumes from the last checkpoint on 1 rank. A replacement agent
    on n2 then joins: both restart, and resume on 2 ranks; the run completes. The timeline is printed."""
    run_dir, port = tmp_path / "run", free_port()
    agents = {h: elastic_agent(nodes, h, tmp_path, tiny_betons, run_dir, port) for h in ("n1", "n2")}
    logs = {h: tmp_path / f"{h}.log" for h in agents}

    def said(text: str, hosts=("n1", "n2")) -> bool:
        return any(logs[h].exists() and text in logs[h].read_text(errors="replace") for h in hosts)

    try:
        nodes.until(lambda: len(rundir.history(rundir.read_metrics(run_dir))) >= 1, 120, "epoch 1 on 2 nodes")
        t0 = time.time()
        for pid in nodes.hosts["n2"].pids():  # the node's training processes die; its slurmd and munged stay
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"torchrun" in cmd or b"dist_resnet.train" in cmd or b"multi_node.sh" in cmd:
                os.kill(pid, signal.SIGKILL)
        nodes.until(lambda: said("resuming a run of 2 ranks on 1", ("n1",)), 180, "n1 going on alone")
        alone = time.time() - t0
        agents["n2"] = elastic_agent(nodes, "n2", tmp_path, tiny_betons, run_dir, port)
        t1 = time.time()
        nodes.until(lambda: said("resuming a run of 1 ranks on 2"), 180, "n2 taken back")
        rejoined = time.time() - t1
        codes = {h: a.wait(300) for h, a in agents.items()}
    finally:
        for a in agents.values():
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    text = "\n".join(f"--- {h}\n{p.read_text(errors='replace')[-3000:]}" for h, p in logs.items())
    print(f"elastic: n1 went on alone {alone:.1f} s after n2's crash; a new n2 was taken back {rejoined:.1f} s after "
          "it started")
    m = metrics(run_dir)
    assert codes == {"n1": 0, "n2": 0}, text
    assert m["completed"] and m["world_size"] == 2 and len(m["history"]) == 30 and m["test_count"] == 200, text


# a long variant: its parts run fast on one node (tests/test_slurm.py: USR1 mid-trial, the trial queued, the task
# requeued and the trial resumed; tests/test_sweep.py: two workers sharing one study on PostgreSQL)
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["journal", "postgresql"])
def test_sweep_tasks_on_two_nodes_share_a_study_and_resume_a_preempted_trial(nodes, tiny_betons, tmp_path, storage):
    """`sbatch --array=0-1 slurm/sweep.sh`: one task on n1, one on n2 (each takes a whole node), one study,
    shared through the journal file in the shared folder, or through PostgreSQL on n1's address. USR1 (the
    time limit) to n2's task while its trial trains: the trial checkpoints and is queued, the task is
    requeued, and the study ends with both trials complete, the preempted one resumed from its checkpoint."""
    from contextlib import nullcontext

    from tests.postgres import server
    from tests.test_slurm import SWEEP, job_output

    with (server(nodes.hosts["n1"].enter(), nodes.hosts["n1"].address) if storage == "postgresql"
          else nullcontext("journal")) as url:
        env = {"CONFIG": TINY[1], "DATA_DIR": str(tiny_betons), "STUDY": "two", "SWEEP_DIR": "sweeps/two",
               "SWEEP_STORAGE": url}
        job = nodes.sbatch(ROOT / "slurm" / "sweep.sh", "--trials", "2", "--sampler", "grid", "--space",
                           "optim.lr=[0.3,0.4]", *SWEEP, "train.epochs=4", options=("--array=0-1", "--job-name=two"),
                           env=env, cwd=tmp_path)
        sweep_dir = tmp_path / "sweeps" / "two"
        nodes.until(lambda: all(nodes.job(f"{job}_{r}").get("JobState") == "RUNNING" for r in (0, 1)), 60,
                    "both tasks running")
        placed = {nodes.job(f"{job}_{r}")["NodeList"]: r for r in (0, 1)}
        assert set(placed) == {"n1", "n2"}, placed
        task = f"{job}_{placed['n2']}"
        nodes.until(lambda: len(list(sweep_dir.glob("trial-*/ckpt-*.pt"))) >= 2, 120, "both trials training")
        nodes.run("scancel", "-s", "USR1", "-b", task)
        nodes.requeued(task)
        for r in (0, 1):
            nodes.wait(f"{job}_{r}", ended, what=f"the end of task {r}")
        log = job_output(tmp_path, "two")
        assert "trials checkpointed and queued to resume; requeueing task" in log, log
        # the report as the last task wrote it (the database listens on n1's address, not this one's)
        import csv

        table = list(csv.DictReader(open(sweep_dir / "results.csv")))
        assert sorted(r["state"] for r in table) == ["complete", "complete", "interrupted"], table
        resumed = [t for t in sweep_dir.glob("trial-*") if "resumed from" in (t / "train.log").read_text()]
        assert len(resumed) == 1, log
        for t in sweep_dir.glob("trial-*"):
            assert metrics(t)["completed"] and metrics(t)["epochs"] == 4
