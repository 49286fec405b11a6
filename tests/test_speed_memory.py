"""Memory of the selective scan's inference paths: no (batch, channels, length, state) tensor, ever.

At the shape below the states would take 1.07 GB in float32 (what the reference loop materialises, twice);
the inference paths must do with the output and a few output-sized temporaries. Each case runs in a fresh
process and compares its peak resident memory after the scan with the peak before it.
"""

import json
import subprocess
import sys

import pytest

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
