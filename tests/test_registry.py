import sys
import textwrap

import pytest

import dmmh
from dmmh.registry import Registry, UnknownComponentError


def make():
    reg = Registry("widget")

    @reg.register("alpha", aliases=("a",))
    def alpha(x=1, y=2):
        return ("alpha", x, y)

    @reg.register()
    class Beta:
        def __init__(self, z=3):
            self.z = z

    return reg


def test_register_create_alias_and_default_name():
    reg = make()
    assert reg.list() == ["Beta", "alpha"]
    assert reg.create("a", x=5) == ("alpha", 5, 2)
    assert reg.get("alpha") is reg.get("a")
    assert reg.create("Beta", z=9).z == 9
    assert "a" in reg and "gamma" not in reg
    assert reg.list(aliases=True) == ["Beta", "a", "alpha"]


def test_create_drops_none_kwargs():
    reg = make()
    assert reg.create("alpha", x=None, y=7) == ("alpha", 1, 7)


def test_list_wildcards():
    reg = Registry("thing")
    for name in ("clip_image", "clip_text", "mlp", "mamba"):
        reg.add(name, dict)
    assert reg.list("clip_*") == ["clip_image", "clip_text"]
    assert reg.list("m*") == ["mamba", "mlp"]
    assert reg.list("?lp") == ["mlp"]
    assert reg.list("nothing*") == []


@pytest.mark.parametrize(
    "registry, typo, expected",
    [
        (dmmh.FUSIONS, "cnn_dep", "cnn_deep"),
        (dmmh.FUSIONS, "additve", "additive"),
        (dmmh.ENCODERS, "mpl", "mlp"),
        (dmmh.HASH_HEADS, "tahn", "tanh"),
        (dmmh.LOSSES, "quantisation", "quantization"),
        (dmmh.FUSIONS, "CNN-Deep", "cnn_deep"),
    ],
)
def test_unknown_name_suggests_closest(registry, typo, expected):
    with pytest.raises(UnknownComponentError) as err:
        registry.create(typo)
    assert expected in str(err.value)
    assert typo in str(err.value)
    with pytest.raises(KeyError):  # still a KeyError for callers that catch that
        registry.get(typo)


def test_duplicate_registration_is_an_error_unless_override():
    reg = make()
    with pytest.raises(ValueError, match="already registered"):
        reg.add("alpha", dict)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("other", dict, aliases=("a",))  # alias clash
    reg.add("alpha", dict, override=True)
    assert reg.get("alpha") is dict
    reg.remove("alpha")
    assert "alpha" not in reg
    reg.add("gamma", list, aliases=("Beta",), override=True)  # an alias replacing a canonical name
    assert reg.get("Beta") is list and reg.list() == ["gamma"]


def test_aliases_from_a_generator_or_a_lone_string():
    reg = Registry("widget")
    reg.add("alpha", dict, aliases=(a for a in ("a", "al")))
    reg.add("beta", list, aliases="bb")
    assert reg.list(aliases=True) == ["a", "al", "alpha", "bb", "beta"]


def test_name_of():
    reg = make()
    beta_cls = reg.get("Beta")
    assert reg.name_of(beta_cls) == "Beta"
    assert reg.name_of(beta_cls()) == "Beta"
    with pytest.raises(UnknownComponentError):
        reg.name_of(dict)


def test_builtins_registered_on_import():
    assert {"mlp"} <= set(dmmh.list_encoders())
    assert {"additive", "cnn_deep"} <= set(dmmh.list_fusions())
    assert {"tanh", "straight_through"} <= set(dmmh.list_hash_heads())
    assert {"classification", "pairwise_similarity", "quantization", "central_similarity"} <= set(dmmh.list_losses())
    assert "synthetic" in dmmh.list_datamodules()


def fake_distribution(folder, monkeypatch, name: str, entry_points: str) -> None:
    """An installed-looking distribution ``name`` with ``entry_points.txt`` on sys.path."""
    dist = folder / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(folder))


def test_entry_point_plugins(tmp_path, monkeypatch):
    """A third-party distribution adds a hash head through the ``dmmh.hash_heads`` group."""
    pkg = tmp_path / "dmmh_plugin_demo.py"
    pkg.write_text(textwrap.dedent(
        """
        import torch
        from dmmh.hashing import HashHead

        class SoftSignHead(HashHead):
            def relax(self, z):
                return torch.nn.functional.softsign(z)
        """
    ))
    fake_distribution(tmp_path, monkeypatch, "dmmh_plugin_demo", "[dmmh.hash_heads]\nsoftsign = dmmh_plugin_demo:SoftSignHead\n")
    reg = Registry("hash head", "dmmh.hash_heads")
    assert reg.list() == ["softsign"]
    head = reg.create("softsign", in_dim=8, n_bits=8)
    assert type(head).__name__ == "SoftSignHead"
    sys.modules.pop("dmmh_plugin_demo", None)


def test_broken_plugin_warns_but_does_not_break(tmp_path, monkeypatch):
    fake_distribution(tmp_path, monkeypatch, "broken_plugin", "[dmmh.test_broken]\nbad = no_such_module_xyz:Thing\n")
    reg = Registry("widget", "dmmh.test_broken")
    with pytest.warns(UserWarning, match="could not load"):
        assert reg.list() == []


def test_checkpoint_naming_an_unregistered_head_says_how_to_register_it(tmp_path, monkeypatch):
    """A fresh process loading a checkpoint whose head is defined downstream: the error says to import the
    defining module or declare the ``dmmh.hash_heads`` entry point, and each remedy then loads it."""
    import lightning as L

    from dmmh.registry import HASH_HEADS

    (tmp_path / "downstream_heads.py").write_text(textwrap.dedent(
        """
        import torch
        from dmmh.hashing import HashHead
        from dmmh.registry import HASH_HEADS

        @HASH_HEADS.register("downstream_softsign")
        class DownstreamSoftSign(HashHead):
            def relax(self, z):
                return torch.nn.functional.softsign(z)
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    import downstream_heads  # noqa: F401  (registers the head)

    data = dmmh.SyntheticMultiLabel(num_train=16, num_query=4, num_database=16, image_dim=6, text_dim=5, num_classes=3, batch_size=8)
    module = dmmh.DMMHModule(image_dim=6, text_dim=5, n_classes=3, n_bits=8, dim=8, encoder="mlp", fusion="additive", head="downstream_softsign")
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, data)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    try:
        HASH_HEADS.remove("downstream_softsign")  # what a fresh process sees: dmmh imported, the downstream module not
        sys.modules.pop("downstream_heads")
        with pytest.raises(UnknownComponentError) as err:
            dmmh.DMMHModule.load_from_checkpoint(ckpt)
        message = str(err.value)
        assert "unknown hash head 'downstream_softsign'" in message
        assert "imported" in message and "'dmmh.hash_heads' entry point" in message

        import downstream_heads  # noqa: F401,F811  (remedy 1: import the defining module)

        assert type(dmmh.DMMHModule.load_from_checkpoint(ckpt).model.head).__name__ == "DownstreamSoftSign"
        HASH_HEADS.remove("downstream_softsign")
        sys.modules.pop("downstream_heads")
        # remedy 2: the package declares the entry point; the registry finds it without an import
        fake_distribution(tmp_path, monkeypatch, "downstream_heads", "[dmmh.hash_heads]\ndownstream_softsign = downstream_heads:DownstreamSoftSign\n")
        monkeypatch.setattr(HASH_HEADS, "_plugins_loaded", False)  # entry points are scanned once per process
        assert type(dmmh.DMMHModule.load_from_checkpoint(ckpt).model.head).__name__ == "DownstreamSoftSign"
    finally:
        if "downstream_softsign" in HASH_HEADS.list():
            HASH_HEADS.remove("downstream_softsign")
        sys.modules.pop("downstream_heads", None)


def test_unknown_name_error_without_plugin_group_has_no_entry_point_hint():
    with pytest.raises(UnknownComponentError) as err:
        make().create("gamma")
    assert "entry point" not in str(err.value)
