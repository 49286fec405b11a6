"""The Mamba layer (mamba-ssm compatibility, its own recurrence) and the ``mamba`` encoder."""

import math

import pytest
import torch
import torch.nn.functional as F

import dmmh
from dmmh.encoders.mamba import Mamba, MambaEncoder


def mamba_ssm_shapes(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False):
    """mamba_ssm.modules.mamba_simple.Mamba's parameters, written out from its constructor."""
    d_inner = int(expand * d_model)
    r = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    shapes = {"A_log": (d_inner, d_state), "D": (d_inner,), "in_proj.weight": (2 * d_inner, d_model)}
    shapes |= {"in_proj.bias": (2 * d_inner,)} if bias else {}
    shapes |= {"conv1d.weight": (d_inner, 1, d_conv)} | ({"conv1d.bias": (d_inner,)} if conv_bias else {})
    shapes |= {"x_proj.weight": (r + 2 * d_state, d_inner), "dt_proj.weight": (d_inner, r), "dt_proj.bias": (d_inner,)}
    shapes |= {"out_proj.weight": (d_model, d_inner)} | ({"out_proj.bias": (d_model,)} if bias else {})
    return shapes


@pytest.mark.parametrize("kw", [dict(d_model=256), dict(d_model=40, d_state=8, d_conv=3, expand=1.5),
                                dict(d_model=17, dt_rank=5, bias=True, conv_bias=False), dict(d_model=8, d_state=1, d_conv=1)])
def test_state_dict_has_mamba_ssm_keys_and_shapes(kw):
    got = {k: tuple(v.shape) for k, v in Mamba(**kw).state_dict().items()}
    assert got == mamba_ssm_shapes(**kw)
    assert list(got)[:2] == ["A_log", "D"]  # mamba-ssm's order: own parameters, then submodules


def test_design_doc_shapes_for_d_model_256():
    sd = Mamba(256).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "A_log": (512, 16), "D": (512,), "in_proj.weight": (1024, 256), "conv1d.weight": (512, 1, 4),
        "conv1d.bias": (512,), "x_proj.weight": (48, 512), "dt_proj.weight": (512, 16), "dt_proj.bias": (512,),
        "out_proj.weight": (256, 512)}


def test_initialisation_follows_mamba_ssm():
    m = Mamba(32, d_state=6, dt_min=0.01, dt_max=0.05)
    assert torch.equal(-torch.exp(m.A_log), -torch.arange(1, 7.0).repeat(64, 1))
    assert torch.equal(m.D, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5) and dt.std() > 0
    std = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= std and m.dt_proj.weight.abs().max() > 0.5 * std


def test_state_dict_round_trip_and_bidirectional_keys():
    a, b = Mamba(24), Mamba(24)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 24)
    assert torch.equal(a(x), b(x))
    bi = Mamba(24, bidirectional=True)
    extra = set(bi.state_dict()) - set(a.state_dict())
    assert extra == {"A_b_log", "D_b", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight", "dt_proj_b.bias"}
    bi.load_state_dict(a.state_dict(), strict=False)  # a unidirectional checkpoint fills the shared/forward part


def layer_by_hand(m: Mamba, x: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """Mamba's computation written step by step, token by token (no selective scan call)."""
    p = {k: v for k, v in m.named_parameters()}
    b, l, _ = x.shape
    xz = x @ p["in_proj.weight"].T
    xs, z = xz[..., : m.d_inner], xz[..., m.d_inner :]
    if suffix:
        xs, z = xs.flip(1), z.flip(1)
    w, cb = p[f"conv1d{suffix}.weight"][:, 0], p[f"conv1d{suffix}.bias"]
    k = w.shape[1]
    pad = torch.cat([xs.new_zeros(b, k - 1, m.d_inner), xs], 1)
    xc = F.silu(torch.stack([(pad[:, t : t + k] * w.T).sum(1) + cb for t in range(l)], 1))
    proj = xc @ p[f"x_proj{suffix}.weight"].T
    dt_in, B, C = proj[..., : m.dt_rank], proj[..., m.dt_rank : m.dt_rank + m.d_state], proj[..., m.dt_rank + m.d_state :]
    dt = F.softplus(dt_in @ p[f"dt_proj{suffix}.weight"].T + p[f"dt_proj{suffix}.bias"])
    A = -torch.exp(p["A_b_log" if suffix else "A_log"])
    h = x.new_zeros(b, m.d_inner, m.d_state)
    ys = []
    for t in range(l):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xc[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(((h * C[:, t, None, :]).sum(-1) + p[f"D{suffix}"] * xc[:, t]) * F.silu(z[:, t]))
    y = torch.stack(ys, 1)
    return y.flip(1) if suffix else y


@pytest.mark.parametrize("backend", ["ref", "cpu", "torch"])
def test_layer_equals_hand_written_recurrence(backend):
    m = Mamba(12, d_state=5, d_conv=3, bidirectional=True, backend=backend)
    x = torch.randn(3, 7, 12)
    y = 0.5 * (layer_by_hand(m, x) + layer_by_hand(m, x, "_b"))
    torch.testing.assert_close(m(x), y @ m.out_proj.weight.T, rtol=1e-5, atol=1e-5)
    uni = Mamba(12, d_state=5, d_conv=3, backend=backend)
    torch.testing.assert_close(uni(x), layer_by_hand(uni, x) @ uni.out_proj.weight.T, rtol=1e-5, atol=1e-5)


def test_layer_is_causal():
    m = Mamba(8, d_state=4)
    x = torch.randn(2, 6, 8)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4:], y2[:, 4:])


def test_encoder_shapes_gradients_and_registry():
    enc = dmmh.ENCODERS.create("mamba", in_dim=10, dim=16, num_tokens=5, depth=2, d_state=4, hidden=(12,), bidirectional=True)
    assert isinstance(enc, MambaEncoder) and len(enc.layers) == 2
    x = torch.randn(3, 10)
    out = enc(x)
    assert out.shape == (3, 5, 16) and enc.pooled(x).shape == (3, 16)
    out.square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    with pytest.raises(ValueError, match="feature width 7 differs"):
        enc(torch.randn(3, 7))
    with pytest.raises(ValueError, match="depth must be >= 1"):
        MambaEncoder(10, depth=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        MambaEncoder(10, backend="gpu")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_encoder_backends_agree_with_gradients(backend):
    torch.manual_seed(0)
    a = MambaEncoder(6, dim=40, num_tokens=9, d_state=3, hidden=(), dropout=0.0, bidirectional=True, backend="ref")
    b = MambaEncoder(6, dim=40, num_tokens=9, d_state=3, hidden=(), dropout=0.0, bidirectional=True, backend=backend)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 6)
    g = torch.randn(5, 9, 40)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5 * pa.grad.abs().max().item(), msg=name)


def test_layer_feeds_the_kernels_channels_contiguous_views(monkeypatch):
    """No transposed copies between the layer's Linear layers, its convolution and its scan; dt reaches the scan
    in low rank (a view of x_proj's output) with dt_proj's weight, for the kernel to project step by step."""
    import dmmh.encoders.mamba as mm

    seen = {}
    real_scan, real_conv = mm.selective_scan_fn, mm.causal_conv1d_fn
    monkeypatch.setattr(mm, "selective_scan_fn", lambda u, dt, A, B, C, D, **kw: seen.setdefault("scan", (u, kw["z"], dt, B, kw["delta_proj"])) and real_scan(u, dt, A, B, C, D, **kw))
    monkeypatch.setattr(mm, "causal_conv1d_fn", lambda x, *a, **kw: seen.setdefault("conv", x) is not None and real_conv(x, *a, **kw))
    layer = Mamba(32, d_state=4)
    layer(torch.randn(2, 7, 32))
    u, z, dt, B, proj = seen["scan"]
    for t in (seen["conv"], u, z):
        assert t.shape[1:] == (64, 7) and t.stride(1) == 1, t.stride()
    assert dt.shape[1:] == (2, 7) and dt.stride(1) == 1 and dt.untyped_storage().data_ptr() == B.untyped_storage().data_ptr()
    assert proj is layer.dt_proj.weight and proj.shape == (64, 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_dmmh_model_trains_and_encodes_in_passes_with_the_same_results(monkeypatch, threads):
    """On the CPU the encoders take a batch in passes of ``rows_per_pass`` tokens, on worker threads when there
    are several: same outputs and gradients as one pass on one thread (float64, where rounding is far below
    the tolerance: in float32 the fusion's BatchNorm cancellation shows it)."""
    torch.manual_seed(0)
    model = dmmh.create_model(image_dim=12, text_dim=9, n_bits=8, encoder="mamba", dim=16,
                              encoder_kwargs={"hidden": (16,), "dropout": 0.0}).double()
    img, txt, g = torch.randn(23, 12).double(), torch.randn(23, 9).double(), torch.randn(23, 8).double()
    before = torch.get_num_threads()

    def run(n_threads, rows):
        monkeypatch.setattr(type(model), "rows_per_pass", rows)
        torch.set_num_threads(n_threads)
        calls = []
        hook = model.encoders["image"].register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
        try:
            model.train().zero_grad()
            out = model(img, txt)
            (out * g).sum().backward()
            codes = model.eval().encode(img, txt)
        finally:
            hook.remove()
            torch.set_num_threads(before)
        return out, [p.grad.clone() for p in model.parameters()], sorted(calls, reverse=True), codes

    o1, g1, c1, e1 = run(1, 10**9)  # one pass, one thread
    assert c1 == [23, 23]  # training, then encoding
    scale = max(g.abs().max().item() for g in g1)
    cases = {1: [(3 * 8, [3] * 7 + [2])], 2: [(10**9, [12, 11]), (3 * 8, [3] * 7 + [2])]}[threads]  # (rows, passes)
    for rows, passes in cases:
        out, grads, calls, codes = run(threads, rows)
        assert calls == sorted(passes * 2, reverse=True)  # training, then encoding
        torch.testing.assert_close(out, o1, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, g1):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * scale)
        assert torch.equal(codes, e1) and not codes.requires_grad and codes.is_inference()


def test_training_in_parallel_passes_is_reproducible_with_dropout(monkeypatch):
    """Dropout masks come from per-pass generators seeded in pass order: two runs from one seed agree exactly,
    whichever thread ran which pass; every parameter gets a gradient; an encoder holding a plain nn.Dropout
    is trained one pass after another instead."""
    before = torch.get_num_threads()
    monkeypatch.setattr(dmmh.DMMH, "rows_per_pass", 4 * 8)
    torch.set_num_threads(2)
    try:
        torch.manual_seed(1)
        model = dmmh.create_model(image_dim=12, text_dim=9, n_bits=8, encoder="mamba", dim=16,
                                  encoder_kwargs={"hidden": (16,), "dropout": 0.5})
        img, txt = torch.randn(30, 12), torch.randn(30, 9)
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            model.zero_grad()
            out = model(img, txt)
            out.square().sum().backward()
            runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
        assert all(g.abs().sum() > 0 for name, g in zip(dict(model.named_parameters()), runs[0][1]) if "encoders" in name)
        torch.manual_seed(8)
        assert not torch.equal(model(img, txt), runs[0][0])  # other seed, other masks
        threads_seen = set()
        model.encoders["text"].drop = torch.nn.Dropout(0.5)  # a random module the passes cannot seed
        model.encoders["text"].register_forward_hook(lambda *a: threads_seen.add(__import__("threading").current_thread().name))
        model(img, txt).sum().backward()
        assert threads_seen == {"MainThread"}
    finally:
        torch.set_num_threads(before)


def test_dmmh_model_with_mamba_encoder_trains_a_step():
    model = dmmh.create_model(image_dim=12, text_dim=9, n_bits=8, encoder="mamba", dim=16, encoder_kwargs={"hidden": (16,)})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    img, txt = torch.randn(6, 12), torch.randn(6, 9)
    before = model.encoders["image"].layers[0].A_log.detach().clone()
    loss = (model(img, txt) - torch.sign(torch.randn(6, 8))).square().mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.encoders["image"].layers[0].A_log)


@pytest.mark.cuda
@pytest.mark.parametrize("d_model,d_state", [(64, 16), (40, 8)])
def test_cpu_path_equals_mamba_ssm_module_on_gpu(d_model, d_state):
    mamba_simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    torch.manual_seed(0)
    ref = mamba_simple.Mamba(d_model=d_model, d_state=d_state).cuda()
    ours = Mamba(d_model, d_state=d_state, backend="cpu")
    ours.load_state_dict({k: v.cpu() for k, v in ref.state_dict().items()})
    x = torch.randn(4, 32, d_model)
    want = ref(x.cuda()).cpu()
    got = ours(x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    # and the other direction: dmmh's weights into mamba-ssm, dmmh on the GPU with its CUDA backend
    ours_cuda = Mamba(d_model, d_state=d_state, backend="cuda").cuda()
    ref.load_state_dict(ours_cuda.state_dict())
    xc = x.cuda()
    assert ((ours_cuda(xc) - ref(xc)).abs().max() / ref(xc).abs().max()).item() <= 1e-5


@pytest.mark.cuda
def test_dmmh_model_trains_a_step_on_gpu():
    module = dmmh.DMMHModule(image_dim=64, text_dim=32, n_classes=5, n_bits=16, encoder="mamba").cuda()
    opt = module.configure_optimizers()
    batch = {"image": torch.randn(64, 64, device="cuda"), "text": torch.randn(64, 32, device="cuda"),
             "label": (torch.rand(64, 5, device="cuda") > 0.5).float()}
    module.log = lambda *a, **k: None
    first = module.training_step(batch, 0)
    for _ in range(5):
        opt.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and loss.item() < first.item()


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training_and_encoding_on_cpu(tmp_path, precision):
    """Lightning's bf16 precisions train the Mamba model on the CPU (C++ kernels taking bf16 activations),
    and bf16 encoding gives codes that mostly agree with fp32 encoding."""
    import lightning as L

    L.seed_everything(0, verbose=False)
    data = dmmh.SyntheticMultiLabel(num_train=128, num_query=32, num_database=256, image_dim=24, text_dim=12, num_classes=4, batch_size=32)
    module = dmmh.DMMHModule(image_dim=24, text_dim=12, n_classes=4, n_bits=16, dim=16, encoder="mamba",
                             encoder_kwargs={"hidden": (16,)})
    before = module.model.encoders["image"].layers[0].A_log.detach().float().clone()
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, precision=precision, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(module.model.encoders["image"].layers[0].A_log.detach().float(), before)
    db = data.splits["database"]
    x, y = torch.from_numpy(db.image), torch.from_numpy(db.text)
    module.float()
    fp32 = module.encode(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = module.encode(x, y)
    assert bf16.dtype == torch.bfloat16 and (fp32 == bf16.float()).float().mean() > 0.9
