"""The examples run end to end on a tiny image–caption set with a tiny random-init open_clip model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
from test_pairs import TINY_CLIP, TINY_NAME, make_pairs_folder  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def one_thread():
    # tiny ops lose far more to thread hand-offs than they gain on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_finetune_pairs_finds_every_item_by_pair_image_and_caption(tmp_path, one_thread, monkeypatch):
    import dmmh.encoders.clip as clip

    fp = load("finetune_pairs")
    make_pairs_folder(tmp_path, 8, "jsonl")
    built = []
    monkeypatch.setattr(clip, "_create", lambda *a, _create=clip._create: built.append(a[1:]) or _create(*a))
    out = fp.run(str(tmp_path), str(tmp_path / "run"), TINY_NAME, None, TINY_CLIP, epochs=300, n_bits=16, dim=16,
                 lr=1e-2, modality_dropout=0.6, seed=0, tags_column=None, cache_dir=str(tmp_path / ".hf"))
    assert len(built) == 2  # the CLIP model is built once per tower, by the model's two encoders (data borrows them)
    index = fp.load_index(out["index"])
    codes, items = index
    assert Path(out["index"]).is_file() and len(items) == 8
    assert codes.codes.shape == (8, 2) and codes.codes.dtype == torch.uint8  # 16 bits packed in 2 bytes
    for mode in fp.MODES:
        hits = out["results"][mode]
        assert len(hits) == 8
        for i, ranked in enumerate(hits):
            assert ranked[0]["id"] == i, (mode, i, ranked)
            assert ranked[0]["distance"] < ranked[1]["distance"], (mode, i, ranked)  # rank 1 without a tie
            assert ranked[0]["path"] == os.path.join(str(tmp_path), os.path.basename(ranked[0]["path"]))
    # a free-form query through the public helper
    data, module = out["data"], out["module"]
    from dmmh.data.pairs import load_image

    hit = fp.query(module, data, index, [load_image(data.table.paths[2])], None, k=1)[0][0]
    assert hit["caption"] == data.table.captions[2]


def test_compose_model(one_thread):
    mod = load("compose_model")
    module, score = mod.main(max_epochs=3)
    # chance: on this data (1-3 of 8 labels per item) random codes already score about 0.44
    import dmmh
    from dmmh.metrics import mean_average_precision

    s = dmmh.SyntheticMultiLabel(num_train=256, num_query=64, num_database=512).splits
    g = torch.Generator().manual_seed(0)
    yq, ydb = torch.from_numpy(s["query"].label), torch.from_numpy(s["database"].label)
    chance = max(float(mean_average_precision(torch.randn(64, 16, generator=g), torch.randn(512, 16, generator=g), yq, ydb))
                 for _ in range(5))
    assert 0.0 <= score <= 1.0 and score > chance + 0.1, (score, chance)  # clearly above chance
    src = (EXAMPLES / "compose_model.py").read_text().splitlines()
    assert len(src) < 30
