"""What the speed work must not change: memory of the scan's inference paths, results of threaded encoding.

Memory: at the shape below the states would take 1.07 GB in float32 (what the reference loop
materialises, twice); the inference paths must do with the output and a few output-sized temporaries.
Each case runs in a fresh process and compares its peak resident memory after the scan with the peak
before it.
"""

import json
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dmmh

B, D, L, N = 8, 2048, 1024, 16
STATE_BYTES = B * D * L * N * 4
OUTPUT_BYTES = B * D * L * 4

CODE = f"""
import json, resource, sys, torch
from dmmh.ops import selective_scan_fn
b, d, l, n = {B}, {D}, {L}, {N}
torch.manual_seed(0)
seq = lambda scale: torch.randn(b, l, d).mul_(scale).transpose(1, 2)  # (b, d, l) as the Mamba layer passes it
u, delta, z = seq(1.0), seq(0.5), seq(1.0)
A = -torch.rand(d, n) - 0.5
B, C = torch.randn(b, n, l), torch.randn(b, n, l)
D_, bias = torch.randn(d), torch.randn(d) * 0.5
run = lambda k: selective_scan_fn(u[:, :, :k], delta[:, :, :k], A, B[..., :k], C[..., :k], D_, z[:, :, :k], bias, True, backend=sys.argv[1])
with torch.inference_mode():
    run(8)  # kernels loaded, allocator warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = run(l)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(extra=after - before, finite=bool(torch.isfinite(out).all()), shape=list(out.shape))))
"""


@pytest.mark.parametrize("backend,bound", [("cpu", OUTPUT_BYTES + (16 << 20)), ("torch", 3 * OUTPUT_BYTES)])
def test_inference_scan_never_materialises_the_states(backend, bound):
    assert STATE_BYTES >= 2**30 and bound < STATE_BYTES / 2
    run = subprocess.run([sys.executable, "-c", CODE, backend], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["shape"] == [B, D, L] and res["finite"]
    print(f"{backend}: peak memory grew by {res['extra'] / 2**20:.0f} MiB (output {OUTPUT_BYTES / 2**20:.0f} MiB, states {STATE_BYTES / 2**30:.2f} GiB)")
    assert res["extra"] <= bound, f"{backend}: {res['extra'] / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for a test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def small_model(rng):
    torch.manual_seed(int(rng.integers(2**63)))
    return dmmh.create_model(image_dim=12, text_dim=9, n_bits=8, encoder="mamba", dim=16, encoder_kwargs={"hidden": (16,)}).eval()


def test_threaded_encoding_equals_one_thread(rng, threads, monkeypatch):
    """Passes on worker threads (uneven: 37 items in passes of at most 5) give one thread's results, in order."""
    model = small_model(rng)
    monkeypatch.setattr(type(model), "rows_per_pass", 5 * 8)
    img, txt = torch.randn(37, 12), torch.randn(37, 9)
    seen = []
    hook = model.encoders["image"].register_forward_hook(lambda m, i, o: seen.append((threading.current_thread().name, torch.get_num_threads(), len(o))))
    results = {}
    for n in (1, 2, 3):
        threads(n)
        seen.clear()
        with torch.no_grad():
            results[n] = model(img, txt)
        assert torch.get_num_threads() == n  # the caller's setting is untouched
        assert sum(k for *_, k in seen) == 37 and max(k for *_, k in seen) <= 5
        assert all(t == 1 for _, t, _ in seen), seen  # every pass runs with one intra-op thread
        assert all(name.startswith("dmmh-pass") for name, *_ in seen)  # on the pass workers, one or several
    hook.remove()
    for n in (2, 3):
        torch.testing.assert_close(results[n], results[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.encode(img, txt), model.encode(img, txt))


def test_passes_can_be_turned_off(rng, threads, monkeypatch):
    model = small_model(rng)
    monkeypatch.setattr(model, "rows_per_pass", None)
    seen = []
    model.encoders["image"].register_forward_hook(lambda m, i, o: seen.append((threading.current_thread().name, len(o))))
    threads(2)
    model.encode(torch.randn(40, 12), torch.randn(40, 9))
    model.train()(torch.randn(40, 12), torch.randn(40, 9)).sum().backward()
    assert seen == [("MainThread", 40)] * 2


def test_worker_threads_keep_the_callers_modes(rng, threads):
    """bf16 autocast and inference mode reach the workers; FLOPs are counted in full (no workers under a dispatch mode)."""
    model = small_model(rng)
    img, txt = torch.randn(40, 12), torch.randn(40, 9)
    threads(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            relaxed = model(img, txt)
        codes = model.encode(img, txt)
    assert relaxed.dtype == torch.bfloat16 and codes.dtype == torch.bfloat16 and codes.is_inference()
    counts = []
    for n in (1, 2):
        threads(n)
        with FlopCounterMode(display=False) as counter:
            model.encode(img, txt)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_worker_errors_reach_the_caller(rng, threads):
    model = small_model(rng)
    img = torch.randn(40, 12)
    img[33, 4] = float("nan")
    threads(2)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        model.encode(img, torch.randn(40, 9))


def test_new_threads_still_get_the_default_thread_count(rng, threads):
    threads(2)
    small_model(rng).encode(torch.randn(40, 12), torch.randn(40, 9))  # creates the worker pool
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2]


def test_training_uses_the_fused_adam_on_cpu():
    """One optimizer kernel per step (the for-loop Adam runs ~10 operators per parameter: 7x slower on 2 cores)."""
    module = dmmh.DMMHModule(image_dim=12, text_dim=9, n_classes=3, n_bits=8, dim=16, encoder="mlp")
    opt = module.configure_optimizers()
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in module.parameters()]
    module.log = lambda *a, **k: None
    batch = {"image": torch.randn(6, 12), "text": torch.randn(6, 9), "label": torch.eye(3)[[0, 1, 2, 0, 1, 2]]}
    module.training_step(batch, 0).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()) if b.grad is not None and b.grad.abs().sum() > 0)


def test_second_backward_through_parallel_passes_says_what_to_do(threads):
    threads(2)
    model = dmmh.create_model(image_dim=12, text_dim=9, n_bits=8, encoder="mamba", dim=16, encoder_kwargs={"hidden": (16,)})
    loss = model(torch.randn(40, 12), torch.randn(40, 9)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated already.*rows_per_pass = None"):
        loss.backward()


def test_pool_follows_the_thread_count_and_forked_children_start_afresh(rng, threads):
    import os

    from dmmh import _passes

    model = small_model(rng)
    img, txt = torch.randn(40, 12), torch.randn(40, 9)
    for n in (2, 3, 2):
        threads(n)
        model.encode(img, txt)
        assert list(_passes._POOL) == [n]  # one pool, of the current size
    if not hasattr(os, "fork"):
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool, not the parent's threads (which do not exist here)
        try:
            ok = not _passes._POOL and torch.equal(model.encode(img, txt), model.encode(img, txt))
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    import select
    import signal

    ready, _, _ = select.select([read], [], [], 120)  # a child stuck on the parent's threads must fail, not hang
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready and os.read(read, 1) == b"1"
