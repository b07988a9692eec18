"""Every onion command against a real S3-compatible server on loopback (moto's standalone server),
configured only through the standard AWS environment; injected 500s and dropped connections."""
import asyncio
import dataclasses
import gc
import json
import multiprocessing
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.compute as pc
import pytest
from fsspec.asyn import sync

from helpers import files_of, onion
from loopback import SECRET, FaultyProxy, aws_environment, environment, free_port, moto_server
from shards import ShardDataset, location, read_index
from shards.urls import Location
from trainer.dynamics import read_dynamics

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

BUCKET = "onion-test"
# One DataLoader worker, forked while the trainer holds pooled connections to the store (through the
# faulty proxy, which keeps connections alive as S3 does; moto's own server closes each one).
TRAIN = ["--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4", "--epochs", "2",
         "--batch-size", "64", "--loader-workers", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def s3():
    """The server's endpoint, with this process's AWS environment pointing at it."""
    with moto_server() as endpoint, environment(aws_environment(endpoint)):
        fresh_filesystems()
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield endpoint
    fresh_filesystems()


def fresh_filesystems() -> None:
    """fsspec caches filesystem objects; a changed endpoint needs new ones."""
    fsspec.get_filesystem_class("s3").clear_instance_cache()


def onion_s3(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    """``onion ARGS`` with the AWS environment pointing at ``endpoint``; it must succeed."""
    result = onion(*args, timeout=600, env={**os.environ, **aws_environment(endpoint)})
    assert result.returncode == 0, f"onion {' '.join(args)}:\n{result.stderr[-3000:]}"
    assert SECRET not in result.stdout + result.stderr  # credentials are never printed
    return result


def objects(url: str) -> dict[str, bytes]:
    """Every object under ``url``, by path relative to it."""
    where = location(url)
    return {path[len(where.root) + 1:]: where.fs.cat_file(path) for path in sorted(where.fs.find(where.root))}


def run_flow(endpoint: str, prefix: str) -> dict[str, bytes]:
    """ingest -> select -> materialize -> train, all on s3://; returns every object written."""
    data, run = f"s3://{BUCKET}/{prefix}/digits", f"s3://{BUCKET}/{prefix}/run"
    onion_s3(endpoint, "ingest", "digits", data, "--shard-size", "300", "--ray-cpus", "1")
    onion_s3(endpoint, "select", data, "--strategy", "random", "--keep", "0.5", "--seed", "1", "--ray-cpus", "1")
    onion_s3(endpoint, "materialize", data, "--selection", "v0001", "--ray-cpus", "1")
    onion_s3(endpoint, "train", f"{data}/kept/v0001", "--out", run, *TRAIN)
    return objects(f"s3://{BUCKET}/{prefix}")


# Files with wall-clock figures or the run's path in them, and the saved RNG state (Python's global
# generator also feeds botocore's retry jitter, so retries change it; training does not draw from it).
VARIABLE = ("run/metrics.csv", "run/summary.json", "run/config.json", "/state.pt", "/latest.json", "/rng-r0.pt")


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """What must be identical between two runs of the same flow: everything but timings and the
    locations that manifests record (the command line, a re-sharded source's URL)."""
    def strip(name: str, data: bytes) -> bytes:
        if not name.endswith("manifest.json"):
            return data
        manifest = json.loads(data)
        manifest.pop("command", None)
        manifest.pop("source", None)
        return json.dumps(manifest, sort_keys=True).encode()
    return {name: strip(name, data) for name, data in files.items() if not name.endswith(VARIABLE)}


@pytest.fixture(scope="module")
def clean_flow(s3):
    return run_flow(s3, "clean")


def test_ingest_to_s3_equals_local_ingest(s3, clean_flow, digits):
    on_disk = files_of(Path(digits))  # the same ingest (digits, shards of 300) to local disk
    remote = {name.removeprefix("digits/"): data for name, data in clean_flow.items()
              if name.startswith("digits/") and (name.count("/") == 1 or name.startswith("digits/index/"))}
    assert sorted(remote) == sorted(on_disk)
    assert comparable(remote) == comparable(on_disk)


def test_whole_flow_runs_on_s3(s3, clean_flow):
    names = set(clean_flow)
    assert {"digits/selections/v0001.json", "digits/kept/v0001/manifest.json", "run/summary.json",
            "run/metrics.csv", "run/checkpoints/latest.json"} <= names
    kept = read_index(location(f"s3://{BUCKET}/clean/digits/kept/v0001"))
    train_keys = sorted(kept.filter(pc.equal(kept["split"], "train"))["key"].to_pylist())
    dynamics = read_dynamics(location(f"s3://{BUCKET}/clean/run"))
    for epoch in (0, 1):  # each survivor trained on exactly once per epoch, streamed from s3
        assert sorted(dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist()) == train_keys
    assert len(clean_flow["run/metrics.csv"].decode().splitlines()) == 3  # header + 2 epochs
    assert not any(SECRET.encode() in data for data in clean_flow.values())


def test_injected_500s_and_dropped_connections_change_nothing(s3, clean_flow):
    with FaultyProxy(s3, error_every=7, drop_every=11) as proxy:
        faulty = run_flow(proxy.endpoint, "faulty")
        assert proxy.errors > 10 and proxy.drops > 5, (proxy.requests, proxy.errors, proxy.drops)
        with environment({"AWS_ENDPOINT_URL": proxy.endpoint}):
            fresh_filesystems()
            dataset = ShardDataset(f"s3://{BUCKET}/faulty/digits", split="train", shuffle=True, seed=0)
            keys = [key for _, _, key in dataset]
        fresh_filesystems()
    assert comparable(faulty) == comparable(clean_flow)  # shards, indexes, selections, weights, dynamics
    summaries = [json.loads(files["run/summary.json"]) for files in (faulty, clean_flow)]
    assert summaries[0]["val_top1"] == summaries[1]["val_top1"] and summaries[0]["steps"] == summaries[1]["steps"]
    assert sorted(keys) == sorted(Counter(keys)) and len(keys) == len(dataset)



def test_two_node_torchrun_streams_each_example_once_per_epoch_from_s3(s3, clean_flow):
    """Two torchrun "nodes" (node ranks 0 and 1, gloo over loopback) train on a dataset on s3://."""
    data, run = f"s3://{BUCKET}/clean/digits/kept/v0001", f"s3://{BUCKET}/ddp/run"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                  "--master-port", str(free_port())]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node-rank", str(rank),
                               "-m", "pipeline", "train", data, "--out", run, *TRAIN],
                              env={**os.environ, **aws_environment(s3)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    summary = json.loads(location(run).read_bytes("summary.json"))
    assert summary["world_size"] == 2
    kept = read_index(location(data))
    train_keys = sorted(kept.filter(pc.equal(kept["split"], "train"))["key"].to_pylist())
    dynamics = read_dynamics(location(run))  # every rank's rows, in one place
    for epoch in (0, 1):
        seen = Counter(dynamics.filter(pc.equal(dynamics["epoch"], epoch))["key"].to_pylist())
        assert sorted(seen) == train_keys and set(seen.values()) == {1}
    parts = {name.split("-s")[0] for name in location(run).child("dynamics").list_names()}
    assert parts == {"part-r0", "part-r1"}


def epoll_registrations() -> set[tuple[int, int, int]]:
    """(epoll fd, registered fd, its inode) for every epoll instance of this process, as the kernel lists
    them. The inode tells a socket from a later one that was given the same fd number."""
    registrations = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:  # closed meanwhile (listdir's own fd, a thread's)
            continue
        registrations |= {(int(name), int(fd), int(inode, 16))
                          for fd, inode in re.findall(r"^tfd:\s*(\d+)\s.*\bino:([0-9a-f]+)", info, flags=re.MULTILINE)}
    return registrations


def connected_to(endpoint: str) -> set[int]:
    """Inodes of the open TCP connections to ``endpoint``'s port, as the kernel lists them."""
    port = int(endpoint.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if os.path.exists(table) else ():
            fields = line.split()  # sl local_address rem_address st ... uid timeout inode
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                inodes.add(int(fields[9]))
    return inodes


def without_idle_expiry(where: Location) -> Location:
    """``where`` with s3fs's ``config_kwargs`` telling aiobotocore never to close an idle pooled
    connection (by default it closes one idle for 12 s: a loaded machine can take that long to fork
    and join a child)."""
    options = dict(where.options)
    options["config_kwargs"] = {**options.get("config_kwargs", {}), "connector_args": {"keepalive_timeout": None}}
    return dataclasses.replace(where, options=tuple(sorted(options.items())))


async def collect_garbage() -> None:
    gc.collect()
    # A finalizer it ran may have left work to the loop (s3fs closes a client in a task): a worker's loop
    # goes on to run it, so let this one too before the child exits.
    if pending := asyncio.all_tasks() - {asyncio.current_task()}:
        await asyncio.wait(pending)


def child_collecting_in_its_own_loop(url: str) -> None:
    """What a DataLoader worker does: its own filesystem and event loop, in which garbage gets collected."""
    fs = location(url).fs
    sync(fs.loop, collect_garbage)


def test_a_forked_child_leaves_the_parents_pooled_connections_registered(s3):
    """A forked child must not close the parent's keep-alive connections through the epoll instance both
    share (s3fs's finalizer did, from the child's garbage collector: the parent then waited forever)."""
    # The proxy keeps connections alive as S3 does, and for as long as they are open (moto closes each one).
    with FaultyProxy(s3) as proxy, environment({"AWS_ENDPOINT_URL": proxy.endpoint}):
        fresh_filesystems()
        where = without_idle_expiry(location(f"s3://{BUCKET}/fork-safety"))
        where.fs.pipe_file(where.path("probe"), b"probe")
        assert where.fs.cat_file(where.path("probe")) == b"probe"
        # The idle connections to the proxy, still watched by the event loop. Told apart by inode, not by
        # what changed: an earlier test's connection closing meanwhile frees an fd number a new one reuses.
        pooled = {watched for watched in epoll_registrations() if watched[2] in connected_to(proxy.endpoint)}
        assert pooled, "no pooled connection to test with"
        child = multiprocessing.get_context("fork").Process(target=child_collecting_in_its_own_loop, args=(where.url,))
        gc.disable()  # inherited: the child's one collection is then the one it runs inside its event loop
        try:
            child.start()
        finally:
            gc.enable()
        child.join(60)
        assert child.exitcode == 0
        assert pooled <= epoll_registrations(), "the child deregistered the parent's sockets"
        assert where.fs.cat_file(where.path("probe")) == b"probe"
    fresh_filesystems()


def test_missing_bucket_is_one_line_naming_the_location(s3):
    result = onion("ingest", "digits", "s3://no-such-bucket/digits", "--ray-cpus", "1",
                   env={**os.environ, **aws_environment(s3)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/digits" in lines[0] and "bucket" in lines[0], result.stderr
    assert SECRET not in result.stderr
