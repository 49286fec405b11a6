"""``prepare()`` end to end on a miniature MIR-Flickr release: byte-identical reruns, the three
formats, resumption after a crash and after SIGKILL, missing and unreadable images, ``check``,
the VGG-19 fc7 backbone against torchvision, and the ``dmmh prepare`` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _raw_releases import make_mirflickr, tiny_clip_spec

from dmmh.cli import main as dmmh_main
from dmmh.data.readers import read_feature_file
from dmmh.prepare import CheckFailed, ImageFeatures, MissingImagesError, RawReleaseError, SplitSizes, check, prepare
from dmmh.prepare.features import VGG19Fc7, image_features

TESTS = Path(__file__).resolve().parent
SIZES = SplitSizes(query=4, database=None, train=6)
PARAMS = {"n_images": 30, "min_tag_count": 3}


@pytest.fixture
def raw(tmp_path, rng):
    make_mirflickr(tmp_path / "raw", rng)
    return tmp_path / "raw"


def _prepare(raw, out, features, **kw):
    kw = {"split_sizes": SIZES, "recipe_params": PARAMS, "chunk_size": 3, "batch_size": 2, "progress": False, **kw}
    return prepare("mirflickr", raw, out, features, **kw)


class Wrapped(ImageFeatures):
    """Another backbone with the same features (same fingerprint) that counts, slows or fails forwards."""

    def __init__(self, inner: ImageFeatures, fail_after: int | None = None, marker: Path | None = None,
                 sleep: float = 0.0):
        super().__init__()
        self.inner, self.fail_after, self.marker, self.sleep = inner, fail_after, marker, sleep
        self.name, self.dim, self.transform = inner.name, inner.dim, inner.transform
        self.forwards = 0

    def describe(self):
        return self.inner.describe()

    def forward(self, x):
        self.forwards += 1
        if self.fail_after is not None and self.forwards > self.fail_after:
            raise RuntimeError("simulated crash")
        if self.marker is not None and self.forwards == 5:
            self.marker.write_text("chunks 0 and 1 are written")
        time.sleep(self.sleep)
        return self.inner(x)


def _clip(tmp_path):
    spec, config = tiny_clip_spec(tmp_path)
    return image_features(spec, model_config=config)


def test_equal_runs_give_equal_bytes_and_every_format_the_same_arrays(tmp_path, raw):
    feats = _clip(tmp_path)
    outs = [_prepare(raw, tmp_path / d / "mir.mat", feats) for d in ("a", "b")]
    assert outs[0].read_bytes() == outs[1].read_bytes()
    manifests = [Path(f"{o}.manifest.json").read_bytes() for o in outs]
    assert manifests[0] == manifests[1]
    m = json.loads(manifests[0])
    assert str(tmp_path) not in manifests[0].decode()  # no absolute paths: the manifest is portable
    assert m["dataset"] == "mirflickr" and m["recipe"]["version"] == 1 and m["output"]["format"] == "mat-v7.3"
    sources = {s["path"]: s for s in m["sources"]}
    import hashlib

    common = raw / "mirflickr" / "doc" / "common_tags.txt"
    assert sources["mirflickr/doc/common_tags.txt"]["sha256"] == hashlib.sha256(common.read_bytes()).hexdigest()
    assert len([p for p in sources if p.startswith("mirflickr25k_annotations_v080/")]) == 24
    tags = sorted((raw / "mirflickr" / "meta" / "tags").iterdir(), key=lambda p: p.name)
    listing = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in tags)
    assert sources["mirflickr/meta/tags/"] == {"path": "mirflickr/meta/tags/", "files": 30,
                                               "bytes": sum(p.stat().st_size for p in tags),
                                               "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    assert m["image_features"]["weights_sha256"] == feats.weights_sha256 and m["image_features"]["dim"] == 32
    assert m["missing_images"] == {"count": 0, "policy": "error", "listing": None}
    common = [line.split() for line in (raw / "mirflickr" / "doc" / "common_tags.txt").read_text().splitlines()]
    assert m["vocabulary"] == [tag for tag, count in common if int(count) >= 3] and len(m["labels"]) == 24
    arrays = m["output"]["arrays"]
    for suffix in (".npz", ".safetensors"):
        other = _prepare(raw, tmp_path / f"mir{suffix}", feats)
        om = check(other)
        assert om["output"]["arrays"] == arrays  # per-array hashes of the row-major values agree across formats
        ff = read_feature_file(other)
        ref = read_feature_file(outs[0])
        for k in arrays:
            np.testing.assert_array_equal(np.asarray(ff.arrays[k]), np.asarray(ref.arrays[k]))
    assert not (tmp_path / "a" / "mir.mat.parts").exists()  # the chunk folder goes once the file is written
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prepare(raw, outs[0], feats)


def test_a_crashed_run_resumes_to_the_same_bytes_without_redoing_finished_chunks(tmp_path, raw):
    feats = _clip(tmp_path)
    reference = _prepare(raw, tmp_path / "ref" / "mir.mat", feats).read_bytes()
    out = tmp_path / "run" / "mir.mat"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _prepare(raw, out, Wrapped(feats, fail_after=5))  # chunks 0 and 1 (2 batches each) finished
    assert not out.exists() and (tmp_path / "run" / "mir.mat.parts").is_dir()
    again = Wrapped(feats)
    _prepare(raw, out, again)
    assert out.read_bytes() == reference
    total = sum(-(-len(r) // 2) for r in [range(s, min(s + 3, 20)) for s in range(0, 20, 3)])  # batches of all chunks
    assert again.forwards == total - 4
    check(out)


def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, raw):
    spec, config = tiny_clip_spec(tmp_path)
    reference = _prepare(raw, tmp_path / "ref" / "mir.mat", image_features(spec, model_config=config)).read_bytes()
    marker, out = tmp_path / "marker", tmp_path / "run" / "mir.mat"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from test_prepare_pipeline import Wrapped, _prepare
        from dmmh.prepare.features import image_features
        feats = image_features({spec!r}, model_config={config!r})
        _prepare(Path({str(raw)!r}), Path({str(out)!r}), Wrapped(feats, marker=Path({str(marker)!r}), sleep=0.3))
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not out.exists()
    again = Wrapped(image_features(spec, model_config=config))
    _prepare(raw, out, again)
    assert out.read_bytes() == reference
    assert again.forwards <= 14 - 4  # chunks 0 and 1 were reused


def test_missing_images_error_or_drop(tmp_path, raw):
    feats = _clip(tmp_path)
    for n in (3, 11):
        (raw / "mirflickr" / f"im{n}.jpg").unlink()
    (raw / "mirflickr" / "im6.jpg").unlink()  # image 6 has no label: its item is dropped before images count
    out = tmp_path / "mir.mat"
    listing = tmp_path / "mir.mat.missing-images.txt"
    with pytest.raises(MissingImagesError, match=re.escape(f"2 of the 20 images of kept items are missing "
                                                           f"({raw / 'mirflickr/im3.jpg'}, {raw / 'mirflickr/im11.jpg'}; "
                                                           f"all listed in {listing})")):
        _prepare(raw, out, feats)
    assert listing.read_text() == "mirflickr/im3.jpg\nmirflickr/im11.jpg\n"
    _prepare(raw, out, feats, missing_images="drop")
    m = check(out)
    assert [c["items"] for c in m["counts"]] == [30, 25, 20, 18]
    assert m["counts"][-1]["step"] == "with an image file"
    assert m["missing_images"] == {"count": 2, "policy": "drop", "listing": listing.name}
    assert sorted(m["splits"]["items"]["query"] + m["splits"]["items"]["database"]).count(3) == 0


def test_an_unreadable_image_is_an_error_naming_it(tmp_path, raw):
    bad = raw / "mirflickr" / "im8.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated download
    with pytest.raises(RawReleaseError, match=re.escape(f"{bad}: unreadable image")):
        _prepare(raw, tmp_path / "mir.npz", _clip(tmp_path))


def test_check_finds_changed_bytes_and_a_changed_manifest(tmp_path, raw):
    out = _prepare(raw, tmp_path / "mir.npz", _clip(tmp_path))
    check(out)
    manifest = Path(f"{out}.manifest.json")
    original = manifest.read_text()
    m = json.loads(original)
    m["labels"] = m["labels"][:-1]
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckFailed, match=re.escape("key 'L_tr': shape (6, 24), the recipe's record gives (6, 23)")):
        check(out)
    manifest.write_text(original)
    from dmmh._io import write_npz

    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["I_te"][2, 5] += 1e-3
    write_npz(out, arrays)
    with pytest.raises(CheckFailed) as err:
        check(out)
    assert "file SHA-256" in str(err.value) and "key 'I_te': sha256" in str(err.value)
    assert "I_db" not in str(err.value)
    Path(f"{out}.manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        check(out)


def test_vgg19_fc7_equals_torchvision_and_runs_in_prepare(tmp_path, rng, raw):
    import torchvision
    from PIL import Image

    feats = VGG19Fc7("random", image_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.vgg19(weights=None).eval()
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3),
                                           dtype=np.uint8)) for _ in range(3)]
    x = torch.stack([feats.transform(im) for im in images])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        h = torch.flatten(net.avgpool(net.features(x)), 1)
        ref = torch.relu(net.classifier[3](torch.relu(net.classifier[0](h))))  # fc6 -> ReLU -> fc7 -> ReLU
        got = feats(x)
    assert got.shape == (3, 4096) and (got >= 0).all()
    torch.testing.assert_close(got, ref)

    out = _prepare(raw, tmp_path / "mir.mat", feats, chunk_size=8, batch_size=4)
    m = check(out)
    assert m["image_features"]["name"] == "vgg19" and m["output"]["arrays"]["I_db"]["shape"] == [16, 4096]
    assert m["image_features"]["weights"].startswith("random") and m["image_features"]["weights_file_sha256"] is None

    path = tmp_path / "vgg19.pth"
    torch.save(net.state_dict(), path)
    loaded = VGG19Fc7(path, image_size=32)
    torch.testing.assert_close(loaded(x), ref)
    assert loaded.describe()["weights"] == "vgg19.pth" and len(loaded.describe()["weights_file_sha256"]) == 64
    assert loaded.describe()["weights_sha256"] == feats.describe()["weights_sha256"]  # equal values, equal hash
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pth"))):
        VGG19Fc7(tmp_path / "nope.pth")
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a state dict of torchvision's vgg19")):
        VGG19Fc7(path)


def test_unknown_features_and_bad_arguments(tmp_path, raw):
    with pytest.raises(ValueError, match="unknown image features 'resnet50'"):
        _prepare(raw, tmp_path / "mir.mat", "resnet50")
    with pytest.raises(ValueError, match=r"must end in \.mat, \.npz, \.safetensors"):
        _prepare(raw, tmp_path / "mir.h5", "vgg19")
    with pytest.raises(FileNotFoundError, match=re.escape(f"raw folder {tmp_path / 'nothing'} not found")):
        prepare("mirflickr", tmp_path / "nothing", tmp_path / "x.mat", "vgg19")
    with pytest.raises(ValueError, match="unknown mirflickr recipe parameter.s. min_count; known: n_images, "
                                         "min_tag_count, require_text, concepts"):
        _prepare(raw, tmp_path / "mir.mat", _clip(tmp_path), recipe_params={"min_count": 3})
    with pytest.raises(ValueError, match=r"split sizes query=40, database=rest, train=6 do not fit the 20 items"):
        _prepare(raw, tmp_path / "mir.mat", _clip(tmp_path), split_sizes=SplitSizes(40, None, 6))


def test_the_command(tmp_path, raw, capsys):
    spec, config = tiny_clip_spec(tmp_path)
    (tmp_path / "arch.json").write_text(json.dumps(config))
    out = tmp_path / "mir.mat"
    args = ["prepare", "mirflickr", "--raw", str(raw), "--out", str(out), "--image-features", spec, "--model-config",
            str(tmp_path / "arch.json"), "--recipe", "n_images=30", "--recipe", "min_tag_count=3", "--no-progress",
            "--num-workers", "0", "--chunk-size", "3", "--batch-size", "2"]
    # the published split sizes do not fit a 30-image fixture: the command says so, in one message
    with pytest.raises(SystemExit, match="dmmh prepare: split sizes query=2243, database=rest, train=5000 do not fit "
                                         "the 20 items"):
        dmmh_main(args)
    dmmh_main(args + ["--query", "4", "--train", "6"])
    assert f"wrote {out}" in capsys.readouterr().out
    _prepare(raw, tmp_path / "api" / "mir.mat", image_features(spec, model_config=config))
    assert out.read_bytes() == (tmp_path / "api" / "mir.mat").read_bytes()  # the command is the function
    dmmh_main(["prepare", "--check", str(out)])
    assert "matches its manifest (mirflickr, mat-v7.3, query 4 / database 16 / train 6" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=re.escape(f"dmmh prepare: {out} exists; check it")):
        dmmh_main(args + ["--query", "4", "--train", "6"])
    with out.open("r+b") as f:  # one changed byte
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(SystemExit, match=re.escape(f"dmmh prepare: {out} does not match")):
        dmmh_main(["prepare", "--check", str(out)])
    with pytest.raises(SystemExit):
        dmmh_main(["prepare", "mirflickr", "--raw", str(raw)])
    assert "give a dataset, --raw and --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dmmh_main(args + ["--recipe", "n_images"])
    assert "--recipe takes KEY=VALUE" in capsys.readouterr().err


def test_the_command_names_missing_extras_before_any_work(tmp_path, raw, monkeypatch):
    for module in ("torchvision", "safetensors"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    out = tmp_path / "mir.safetensors"
    with pytest.raises(SystemExit) as err:
        dmmh_main(["prepare", "mirflickr", "--raw", str(raw), "--out", str(out)])
    message = str(err.value)
    assert message.startswith("dmmh prepare:") and "'torchvision'" in message and "'safetensors'" in message
    assert "pip install 'dmmh[data,prepare]'" in message and message.count("dmmh prepare") == 1
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_vgg19_without_weights_names_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"))
                       + ".*torchvision's cache.*--weights FILE"):
        VGG19Fc7()
