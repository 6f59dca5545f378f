"""train.loader: image files held decoded in memory or streamed through DataLoader workers.

The two ways must give the same batches, bit for bit (same shuffles, same uint8 pixels, same
float arithmetic), so a run's numbers do not depend on how its data was fed.
"""

from __future__ import annotations

import json

import pytest
import torch

from genspec.data import datasets as D
from genspec.compiler.distributed import World
from genspec.lang.validate import DATA_DEFAULTS
from spec_helpers import cli_in_process, problems_of, run_cli, tiny_digits_vae
from test_specs import make_image_folder

IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), channels=3, n=40)


def folder_data(root, **extra) -> dict:
    return {**DATA_DEFAULTS, "dataset": "image_folder", "root": str(root), "image_size": IMAGE_SIZE,
            "range": [-1, 1], "pad": 1, "split": {"train": 30, "test": 10}, **extra}


def all_batches(split, size=7, seed=3, world=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)  # None: in order, as evaluation reads
    return [(x.clone(), y.clone()) for x, y in D.batches(split, size, generator, world)]


def test_auto_holds_a_small_folder_in_memory_and_streams_beyond_the_limit(folder, monkeypatch):
    small = D.load_data(folder_data(folder), 0)
    assert not small.train.streamed and small.train.x.dtype == torch.float32
    assert not any("streamed" in note for note in small.notes)
    monkeypatch.setattr(D, "MEMORY_LIMIT_BYTES", 1000)  # 40 images of 3x8x8 float32 are 30,720 bytes
    large = D.load_data(folder_data(folder), 0, workers=0)
    assert large.train.streamed and large.test.streamed
    assert any("streamed from image files" in note and "0 DataLoader worker(s)" in note for note in large.notes)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_in_memory_batches(folder, workers):
    memory = D.load_data(folder_data(folder), 0, loader="memory")
    stream = D.load_data(folder_data(folder), 0, loader="stream", workers=workers)
    assert stream.train.streamed and stream.train.x.workers == workers
    assert len(stream.train) == len(memory.train) == 30 and len(stream.test) == 10
    a, b = all_batches(memory.train), all_batches(stream.train)
    assert len(a) == len(b) == 5  # 30 = 4 x 7 + 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, IMAGE_SIZE + 2, IMAGE_SIZE + 2)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(all_batches(memory.test, seed=None)[0][0], all_batches(stream.test, seed=None)[0][0])
    assert torch.equal(memory.test.images(), stream.test.images())
    assert torch.equal(memory.train.images([5, 0, 17]), stream.train.images([5, 0, 17]))
    assert torch.equal(memory.train.images(slice(4)), stream.train.images(slice(4)))


def test_each_rank_decodes_only_its_slice_of_the_global_batch(folder):
    memory = D.load_data(folder_data(folder), 0, loader="memory")
    stream = D.load_data(folder_data(folder), 0, loader="stream", workers=0)
    whole = all_batches(memory.train, size=8)
    ranks = [all_batches(stream.train, size=8, world=World(rank, 2, rank)) for rank in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 4  # 30 = 3 x 8 + 6: every global batch feeds both
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks):
        assert torch.equal(x0, x[0::2]) and torch.equal(x1, x[1::2]) and torch.equal(y1, y[1::2])


def test_a_last_global_batch_smaller_than_the_world_is_dropped(folder):
    memory = D.load_data(folder_data(folder, split={"train": 25, "test": 10}), 0, loader="memory")
    single = all_batches(memory.train, size=8)
    triple = all_batches(memory.train, size=8, world=World(0, 3, 0))
    assert [len(x) for x, _ in single] == [8, 8, 8]  # the last batch of one is dropped (batch norm needs two)
    assert [len(x) for x, _ in triple] == [3, 3, 3]
    memory = D.load_data(folder_data(folder, split={"train": 26, "test": 10}), 0, loader="memory")
    assert [len(x) for x, _ in all_batches(memory.train, size=8, world=World(2, 3, 2))] == [2, 2, 2]  # 8 8 8 2: too few for 3


def test_workers_auto_is_one_per_core_but_one(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(D.os, "cpu_count", lambda: 16)
    assert D.resolve_workers("auto") == 8
    monkeypatch.setattr(D.os, "cpu_count", lambda: 2)
    assert D.resolve_workers("auto") == 1
    assert D.resolve_workers(0) == 0 and D.resolve_workers(3) == 3
    monkeypatch.setattr(D.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four training processes on this machine share its cores
    assert D.resolve_workers("auto") == 3


def test_stream_on_a_dataset_held_in_memory_is_a_located_error():
    text = tiny_digits_vae("s").replace("device: cpu}", "device: cpu, loader: stream}")
    [problem] = problems_of(text)
    assert problem.startswith("spec.yaml:23:58: ") and "train.loader: stream decodes image files (image_folder and celeba)" in problem
    assert "digits is held in memory" in problem
    [problem] = problems_of(tiny_digits_vae("w").replace("device: cpu}", "device: cpu, workers: -1}"))
    assert "train.workers" in problem


FOLDER_VAE = tiny_digits_vae("folder_vae").replace(
    "data: {dataset: digits, split: {train: 64, test: 32}}",
    "data: {dataset: image_folder, image_size: 8, channels: 1, split: {train: 30, test: 10}}")


def test_a_streamed_run_matches_the_same_run_in_memory(tmp_path, folder):
    spec = tmp_path / "folder_vae.yaml"
    spec.write_text(FOLDER_VAE.replace("batch_size: 32", "batch_size: 8").replace("epochs: 1", "epochs: 2"))
    records = {}
    for loader, workers in (("memory", 0), ("stream", 2)):
        out = tmp_path / loader
        rc, _, err = cli_in_process("run", spec, "--out", out, "--no-progress", "--set", f"data.root={folder}",
                                    "--set", f"train.loader={loader}", "--set", f"train.workers={workers}")
        assert rc == 0, err
        records[loader] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        metrics = json.loads((out / "metrics.json").read_text())
        assert any("streamed" in note for note in metrics["data"]["notes"]) == (loader == "stream")
    for a, b in zip(records["memory"], records["stream"]):
        assert a["train"] == b["train"] and a["test"] == b["test"]  # the same numbers, bit for bit
    # how the data is fed may change on resume: it does not change the batches
    rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "stream", "--resume", "--no-progress",
                                "--set", f"data.root={folder}", "--set", "train.loader=memory", "--set", "train.epochs=3")
    assert rc == 0, err


def test_two_processes_stream_the_same_batches_as_they_hold_in_memory(tmp_path, folder):
    """--nproc 2 with streamed files: each rank decodes only its slice of every global batch, and
    the run is the same, bit for bit, as the same two-process run with the data in memory."""
    spec = tmp_path / "folder_vae.yaml"
    spec.write_text(FOLDER_VAE.replace("batch_size: 32", "batch_size: 8"))
    tests = {}
    for loader in ("memory", "stream"):
        out = tmp_path / loader
        result = run_cli(["run", str(spec), "--out", str(out), "--no-progress", "--nproc", "2", "--set", f"data.root={folder}",
                          "--set", f"train.loader={loader}", "--set", "train.workers=1"], timeout=300)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        tests[loader] = [(r["train"], r["test"]) for r in records]
    assert tests["memory"] == tests["stream"] and len(tests["stream"]) == 1


def test_evaluation_sees_every_example_and_batch_size_one_trains(folder):
    memory = D.load_data(folder_data(folder, split={"train": 25, "test": 10}), 0, loader="memory")
    evaluation = [len(x) for x, _ in D.batches(memory.train, 8, None, training=False)]
    assert evaluation == [8, 8, 8, 1]  # evaluation runs in eval mode: a batch of one is fine
    assert len(all_batches(memory.train, size=1)) == 25  # batch_size 1: every batch is one, none left out
    assert [len(x) for x, _ in all_batches(memory.train, size=5)] == [5] * 5


@pytest.mark.parametrize("examples, batch_size, world_size, dropped", [
    (25, 8, 1, True), (26, 8, 1, False), (25, 1, 1, False), (1, 16, 1, False), (26, 8, 3, True),
    # across processes: a last batch dealt out so that some rank gets a single example is left out
    (27, 8, 3, True), (7, 4, 2, True), (30, 8, 3, False), (6, 4, 2, True), (10, 6, 2, False), (5, 2, 2, True), (6, 2, 2, False),
])
def test_drops_last_batch_matches_the_batches(examples, batch_size, world_size, dropped):
    assert D.drops_last_batch(examples, batch_size, world_size) is dropped
    split = D.Split(torch.arange(examples, dtype=torch.float32).reshape(examples, 1), None)
    full = len(range(0, examples, batch_size))
    for rank in range(world_size):
        sizes = [len(x) for x, _ in D.batches(split, batch_size, None, World(rank=rank, size=world_size))]
        assert len(sizes) == full - dropped == len(D.batch_starts(examples, batch_size, world_size))
        # no rank trains a batch of one where its full batches hold more (batch norm would fail on it)
        assert min(sizes, default=2) >= min(2, batch_size // world_size, examples)
