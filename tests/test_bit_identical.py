"""Runs give the same bits as before the package was reorganised into stages with training hooks.

`tests/fixtures/bit_identical.json` holds fingerprints of five small CPU runs, recorded with the
code before the move to sub-packages and hooks (commit f64e728): the quick-start VAE, a
conditional GAN with CGAN-MBL balancing and a step trace, BEGAN (a state and its trace),
Larsen's VAE-GAN on a tiny image folder, and a stacked two-seed study. A fingerprint is the
SHA-256 of every tensor of the checkpoint (weights, buffers, optimiser moments, random streams)
and of the history (metrics.jsonl without its timings) and the final metrics.

The hashes are compared where the recording machine's kernels are the same (same CPU model
and torch version): there any change in what a run computes, however small, fails. On another
CPU the float kernels may round differently, so there the losses are compared to 1e-4 relative:
still far tighter than any change of behaviour (one extra random draw moves them by percents).

Record afresh (only when a change of results is intended, and say so in the commit):
    GENSPEC_DATA= .venv/bin/python tests/test_bit_identical.py --record
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from spec_helpers import REPO, TINY_BEGAN, TINY_CONDITIONAL_GAN, cli_in_process  # noqa: E402

GOLDEN = HERE / "fixtures" / "bit_identical.json"
TIMINGS = {"seconds", "commit", "hardware"}  # and every key ending in _s (seconds)

BALANCED_GAN = TINY_CONDITIONAL_GAN.replace(
    "train: {epochs: 1,", "train: {balance: {latent: c, images: x_fake, samples: 64}, trace: [d_loss], epochs: 2,")
STACKED_STUDY = TINY_CONDITIONAL_GAN.replace("name: tiny_cgan", "name: tiny_cgan_study\nrepeats: 2").replace(
    "train: {epochs: 1,", "train: {epochs: 2,")


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("cls_a" if i % 2 else "cls_b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (80, 70, 3), dtype=np.uint8), "RGB").save(folder / f"img_{i:02d}.png")
    return root


def _cases(tmp: Path) -> dict[str, tuple[list, list[Path]]]:
    """name -> (genspec run arguments, the run folders it writes)."""
    (tmp / "gan.yaml").write_text(BALANCED_GAN)
    (tmp / "began.yaml").write_text(TINY_BEGAN)
    (tmp / "study.yaml").write_text(STACKED_STUDY)
    images = _image_folder(tmp / "images")
    quiet = ["--no-progress"]
    return {
        "quickstart": ([REPO / "specs" / "quickstart.yaml", "--out", tmp / "quickstart", "--set", "train.epochs=2",
                        "--set", "data.split={train: 256, test: 64}", *quiet], [tmp / "quickstart"]),
        "balanced_gan": ([tmp / "gan.yaml", "--out", tmp / "gan", *quiet], [tmp / "gan"]),
        "began": ([tmp / "began.yaml", "--out", tmp / "began", *quiet], [tmp / "began"]),
        "vaegan": ([REPO / "specs" / "larsen_vaegan.yaml", "--out", tmp / "vaegan", "--set", "data.dataset=image_folder",
                    "--set", f"data.root={images}", "--set", "data.split.train=16", "--set", "data.split.test=8",
                    "--set", "train.batch_size=8", "--set", "evaluate.fid=null", "--set", "train.device=cpu",
                    "--set", "train.epochs=1", *quiet], [tmp / "vaegan"]),
        "stacked_study": ([tmp / "study.yaml", "--out", tmp / "study", "--stack", *quiet],
                          [tmp / "study" / "run" / "seed0", tmp / "study" / "run" / "seed1"]),
    }


def _digest(value, h) -> None:
    """Feed a checkpoint's nested dicts/lists of tensors and numbers into `h`, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _digest(value[key], h)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, h)
    elif torch.is_tensor(value):
        h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    else:
        h.update(repr(value).encode())


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _losses(history: list) -> list[float]:
    return [v for record in history for part in ("train", "test") for _, v in sorted(record.get(part, {}).items())]


def fingerprint(folder: Path) -> dict:
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    h = hashlib.sha256()
    _digest({k: state[k] for k in ("epoch", "model", "rng")}, h)
    history = [_without_timings(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    metrics = _without_timings(json.loads((folder / "metrics.json").read_text()))
    return {"checkpoint": h.hexdigest(),
            "history": hashlib.sha256(json.dumps(history, sort_keys=True).encode()).hexdigest(),
            "metrics": hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest(),
            "losses": _losses(history)}


def machine() -> dict:
    from genspec.measure.provenance import cpu_name

    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def train_case(name: str, tmp: Path) -> list[dict]:
    args, folders = _cases(tmp)[name]
    torch.set_num_threads(GOLDEN_THREADS)
    rc, _, err = cli_in_process("run", *args)
    assert rc == 0, err
    return [fingerprint(f) for f in folders]


GOLDEN_THREADS = 2  # the kernels' reduction order depends on the thread count: fix it


@pytest.mark.parametrize("name", ["quickstart", "balanced_gan", "began", "vaegan", "stacked_study"])
def test_runs_are_bit_identical_to_the_recorded_ones(name, tmp_path, monkeypatch):
    monkeypatch.delenv("GENSPEC_DATA", raising=False)
    golden = json.loads(GOLDEN.read_text())
    threads = torch.get_num_threads()
    try:
        got = train_case(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    expected = golden["runs"][name]
    assert len(got) == len(expected)
    same_kernels = golden["machine"] == machine() | {"threads": GOLDEN_THREADS}
    for run, want in zip(got, expected):
        if same_kernels:
            assert run == want
        else:
            assert run["losses"] == pytest.approx(want["losses"], rel=1e-4)


def record() -> None:
    import tempfile

    runs = {}
    for name in ["quickstart", "balanced_gan", "began", "vaegan", "stacked_study"]:
        with tempfile.TemporaryDirectory() as tmp:
            runs[name] = train_case(name, Path(tmp))
            print(name, runs[name][0]["checkpoint"][:16], file=sys.stderr)
    GOLDEN.write_text(json.dumps({"machine": machine() | {"threads": GOLDEN_THREADS}, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_bit_identical.py --record")
    record()
