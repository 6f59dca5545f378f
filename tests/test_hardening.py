"""Hostile and careless input (issue 23): every case ends in one located genspec line and a
non-zero exit, memory stays bounded, and nothing the user wrote is lost."""

from __future__ import annotations

import os

import pytest

from spec_helpers import QUICKSTART, cli_in_process


def validate(*files) -> tuple[int, str]:
    rc, out, err = cli_in_process("validate", *files)
    assert "Traceback" not in err
    return rc, err


# ---------------------------------------------------------------- files that are not specs

@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "folder"])
def test_extends_of_a_file_that_never_ends_is_refused_at_the_key(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
    if target == "folder":
        (tmp_path / "folder").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"genspec: 1\nextends: {target}\n")
    rc, err = validate(spec)
    assert rc == 2 and f"{spec}:2:1: extends: base spec {target}: not a regular file" in err


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_spec_that_is_not_a_regular_file(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "fifo")
        target = tmp_path / "fifo"
    rc, err = validate(target)
    assert rc == 2 and "not a regular file" in err and len(err.strip().splitlines()) == 1


def test_huge_spec_and_huge_base_are_refused_without_reading_them(tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(50_000_000)  # sparse: 50 MB that cost no disk
    rc, err = validate(huge)
    assert rc == 2 and "larger than any spec" in err
    spec = tmp_path / "spec.yaml"
    spec.write_text("genspec: 1\nextends: huge.yaml\n")
    rc, err = validate(spec)
    assert rc == 2 and f"{spec}:2:1: extends: base spec huge.yaml:" in err and "larger than any spec" in err


@pytest.mark.parametrize("content, kind", [("root:x:0:0:root:/root:/bin/bash\nbin:x:1:1::/bin:\n", "text"),
                                           ("- a\n- b\n", "a list")])
def test_extends_of_a_file_that_is_not_a_mapping(tmp_path, content, kind):
    (tmp_path / "passwd").write_text(content)
    spec = tmp_path / "spec.yaml"
    spec.write_text(QUICKSTART.read_text() + "extends: passwd\n")
    rc, err = validate(spec)
    line = len(QUICKSTART.read_text().splitlines()) + 1
    assert rc == 2 and f"{spec}:{line}:1: extends: base spec passwd" in err
    assert f"holds {kind}, not a mapping of spec keys" in err or "is not a readable spec" in err


def test_an_empty_base_is_an_empty_mapping(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    spec = tmp_path / "spec.yaml"
    spec.write_text(QUICKSTART.read_text() + "extends: empty.yaml\n")
    assert validate(spec)[0] == 0


# ---------------------------------------------------------------- small ones

@pytest.mark.parametrize("text, tag", [("name: !foo [1, 2]", "!foo"), ("name: !!python/object:os.system x", "python/object"),
                                       ("name: !!set {a: null}", "set")])
def test_yaml_tags_are_refused_where_they_stand(tmp_path, text, tag):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"genspec: 1\n{text}\n")
    rc, err = validate(spec)
    assert rc == 2 and f"{spec}:2:7: name: YAML tag" in err and tag in err


def test_standard_tags_written_out_are_plain_values(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(QUICKSTART.read_text().replace("name: quickstart", "name: !!str quickstart"))
    assert validate(spec)[0] == 0


@pytest.mark.parametrize("override, message", [("train..epochs=5", "empty part between dots"),
                                               (".train.epochs=5", "empty part between dots"),
                                               ("extends=other.yaml", "write a variant that extends")])
def test_overrides_that_cannot_mean_anything(override, message):
    rc, err = validate(QUICKSTART, "--set", override)
    assert rc == 2 and f"--set {override}" in err and message in err


def test_a_failed_write_says_what_was_being_written(tmp_path):
    (tmp_path / "graph.png").mkdir()
    rc, out, err = cli_in_process("graph", QUICKSTART, "--format", "png", "--out", tmp_path / "graph.png")
    assert rc == 1 and err.strip() == f"genspec: cannot write the graph picture ({tmp_path / 'graph.png'}): Is a directory"


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    """`genspec show SPEC | head -1`: the reader closes the pipe, the next write raises
    BrokenPipeError; genspec stops without a 'Broken pipe' message."""
    import io

    from genspec import cli

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert cli.main(["show", str(QUICKSTART)]) == 141
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- run folders

def run_vae(folder, name="v", tail="", *args):
    from spec_helpers import tiny_digits_vae

    spec = folder / f"{name}.yaml"
    spec.write_text(tiny_digits_vae(name, tail))
    rc, out, err = cli_in_process("run", spec, "--out", folder / name, "--no-progress", *args)
    return rc, err, spec


def test_checkpoint_of_another_shape_is_one_line(tmp_path):
    import shutil

    assert run_vae(tmp_path, "v", "", "--set", "train.epochs=1")[0] == 0
    (tmp_path / "w.yaml").write_text((tmp_path / "v.yaml").read_text().replace('"fc 16, relu", gaussian 2', '"fc 24, relu", gaussian 2')
                                     .replace("name: v", "name: w"))
    assert cli_in_process("run", tmp_path / "w.yaml", "--out", tmp_path / "w", "--no-progress")[0] == 0
    shutil.copy(tmp_path / "w" / "checkpoint.pt", tmp_path / "v" / "checkpoint.pt")
    rc, _, err = cli_in_process("run", tmp_path / "v.yaml", "--out", tmp_path / "v", "--resume", "--set", "train.epochs=2",
                                "--no-progress")
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "v" / "checkpoint.pt") in err and "network enc: tensor" in err and "24x64 in the checkpoint but 16x64 in the spec" in err
    rc, _, err = cli_in_process("sample", tmp_path / "v")
    assert rc == 1 and "does not fit the run's spec.resolved.yaml: network enc" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, lost", [("cut", "1 epoch (2)"), ("removed", "2 epochs (1-2)")])
def test_history_that_lost_records_is_not_resumed_silently(tmp_path, damage, lost):
    assert run_vae(tmp_path, "v", "", "--set", "train.epochs=2")[0] == 0
    history = tmp_path / "v" / "metrics.jsonl"
    if damage == "cut":
        text = history.read_text()
        history.write_text(text[: len(text) - 40])  # the last record cut short
    else:
        history.unlink()
    rc, _, err = cli_in_process("run", tmp_path / "v.yaml", "--out", tmp_path / "v", "--resume", "--set", "train.epochs=3",
                                "--no-progress")
    assert rc == 1 and f"has no record of {lost}" in err and "--overwrite" in err
    assert (tmp_path / "v" / "checkpoint.pt").exists()  # nothing was touched


def test_overwrite_through_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    spec = tmp_path / "v.yaml"
    from spec_helpers import tiny_digits_vae

    spec.write_text(tiny_digits_vae("v"))
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli_in_process("run", spec, "--out", tmp_path / "link", "--no-progress", *extra)
        assert rc == 0, err
    assert (tmp_path / "link").is_symlink() and (real / "metrics.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real", "v.yaml"]  # no .link.replaced left


def test_a_link_to_nothing_is_refused_before_training(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    rc, err, _ = run_vae(tmp_path, "v")
    rc, _, err = cli_in_process("run", tmp_path / "v.yaml", "--out", tmp_path / "link", "--no-progress")
    assert rc == 1 and "which does not exist" in err


def test_overwrite_replaces_only_the_runs_files(tmp_path):
    from spec_helpers import tiny_digits_vae

    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v"))
    out = tmp_path / "run"
    assert cli_in_process("run", spec, "--out", out, "--no-progress")[0] == 0
    notes = out / "notes.txt"
    notes.write_text("my notes")
    (out / "mine.png").write_bytes(b"a picture of my own")
    inode = notes.stat().st_ino
    rc, _, err = cli_in_process("run", spec, "--out", out, "--no-progress", "--overwrite")
    assert rc == 0, err
    assert notes.read_text() == "my notes" and notes.stat().st_ino == inode  # neither deleted nor moved
    assert (out / "mine.png").read_bytes() == b"a picture of my own" and (out / "metrics.json").exists()
    assert not any(p.name.startswith(".run.") for p in tmp_path.iterdir())


def test_a_folder_of_other_files_is_still_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("x")
    rc, err, _ = run_vae(tmp_path, "docs")
    assert rc == 1 and "is not empty and is not a genspec run folder" in err


def test_a_move_aside_cut_short_is_put_back(tmp_path):
    """A kill while --overwrite moved the old run aside leaves .run.replacing: the next run puts
    those files back first, so the old run is whole again (and then moved aside in one piece)."""
    from spec_helpers import tiny_digits_vae

    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v"))
    out = tmp_path / "run"
    assert cli_in_process("run", spec, "--out", out, "--no-progress")[0] == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    staging = tmp_path / ".run.replacing"
    staging.mkdir()
    (out / "checkpoint.pt").rename(staging / "checkpoint.pt")  # the kill came after the first file
    rc, _, err = cli_in_process("run", spec, "--out", out, "--no-progress", "--resume", "--set", "train.epochs=2")
    assert rc == 0, err
    assert not staging.exists()
    history = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(history) == 2  # resumed from the checkpoint that had been half moved away
    assert checkpoint != (out / "checkpoint.pt").read_bytes()


# ---------------------------------------------------------------- memory

def test_a_layer_size_past_nine_digits_is_too_large(tmp_path):
    from spec_helpers import tiny_digits_vae

    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v").replace('"fc 16, relu", gaussian 2', '"fc 1000000000, relu", gaussian 2'))
    rc, err = validate(spec)
    assert rc == 2 and "'1000000000': a layer size, kernel or stride is at most 999,999,999" in err


def test_a_network_too_large_for_the_budget_is_refused_with_the_estimate(tmp_path):
    from spec_helpers import tiny_digits_vae

    spec = tmp_path / "v.yaml"
    spec.write_text(tiny_digits_vae("v").replace('"fc 16, relu", gaussian 2', '"fc 100000000, relu", gaussian 2'))
    rc, err = validate(spec)
    assert rc == 2 and f"{spec}:7:3: networks.enc: one training step needs about 126.7 GiB" in err
    assert "6,900,000,004 parameters" in err and "--set train.memory_budget=GIB" in err
    assert validate(spec, "--set", "train.memory_budget=200")[0] == 0


def test_the_estimate_counts_weights_moments_and_activations_per_call():
    import genspec
    from genspec.lang.validate import step_memory

    spec = genspec.load(str(QUICKSTART))
    estimate = step_memory(spec.raw, spec.train, spec.networks)
    enc = spec.networks["enc"]
    values = sum(__import__("math").prod(r.out_shape) for r in enc.info.rows)
    assert estimate["enc"]["weights"] == 16 * (enc.info.trainable + enc.info.frozen)
    assert estimate["enc"]["activations"] == 2 * 4 * values * spec.train["batch_size"]  # called once: enc(x)


def test_an_allocation_failure_at_run_time_is_one_line(tmp_path, monkeypatch):
    """What the CPU allocator raises when the estimate was too kind ends in a genspec line."""
    import genspec.train.loop

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 51600000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(genspec.train.loop, "prepare", refuse)
    rc, err, _ = run_vae(tmp_path, "v")
    assert rc == 1 and err.startswith("genspec: out of memory on the CPU") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- pointing at the token

@pytest.mark.parametrize("old, new, token", [
    ('"fc 16, relu", gaussian 2', '"conv banana 5x5", gaussian 2', "banana"),
    ("rec: sqerr(x_rec, x)", "rec: sqerr(x_rec, relu)", "relu"),
    ("kl: kl(q, z)", "kl: kl(q, z", None),  # a parse error points at the character it names
])
def test_errors_point_at_the_offending_token(tmp_path, old, new, token):
    from spec_helpers import tiny_digits_vae

    text = tiny_digits_vae("v").replace(old, new)
    spec = tmp_path / "v.yaml"
    spec.write_text(text)
    rc, err = validate(spec)
    head, source, caret = err.rstrip("\n").splitlines()
    number = next(i for i, line in enumerate(text.splitlines(), 1) if new.split(":")[0] in line and new in line)
    line = text.splitlines()[number - 1]
    column = line.index(token) + 1 if token else line.index(new.split(": ", 1)[1]) + len(new.split(": ", 1)[1]) + 1
    assert rc == 2 and head.startswith(f"{spec}:{number}:{column}: ")
    assert source == "    " + line and caret == "    " + " " * (column - 1) + "^"
    if token:
        assert f"'{token}'" in head


def test_a_relayed_multi_line_message_is_cut_to_a_line_and_a_hint(tmp_path):
    """torch's refusal of a weights file that is not plain tensors is a page long: quoted in
    genspec's message it is one line and one hint."""
    import pickle

    import torch

    from genspec.measure import fidelity
    from genspec.errors import RunError, relayed

    assert relayed(RuntimeError("first\n\n  second  \nthird\nfourth")) == "first; second"
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1), "extra": pickle.loads(pickle.dumps(Path_like()))}, path)
    with pytest.raises(RunError) as exc:
        fidelity._safe_check(path)
    assert len(str(exc.value).splitlines()) == 1 and str(path) in str(exc.value)


class Path_like:  # a class torch's weights_only loader refuses
    pass
