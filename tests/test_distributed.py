"""Training and evaluation under Lightning's DDP strategy: 2 CPU processes with gloo."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    import dmmh
    from dmmh.metrics import mean_average_precision

    out = sys.argv[1]
    L.seed_everything(0, verbose=False)
    # odd split sizes: the distributed sampler pads with duplicates, which the metric must drop
    data = dmmh.SyntheticMultiLabel(num_train=200, num_query=61, num_database=203, image_dim=24, text_dim=12,
                                    num_classes=5, batch_size=32, eval_batch_size=16, val_split="test")
    module = dmmh.DMMHModule(image_dim=24, text_dim=12, n_classes=5, n_bits=16, encoder="mlp", dim=16)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, data)
    logged = trainer.validate(module, data, verbose=False)[0]["val/mAP"]
    if trainer.global_rank == 0:
        q, db = data.splits["query"], data.splits["database"]
        qc = module.encode(torch.from_numpy(q.image), torch.from_numpy(q.text))
        dc = module.encode(torch.from_numpy(db.image), torch.from_numpy(db.text))
        direct = mean_average_precision(qc, dc, torch.from_numpy(q.label), torch.from_numpy(db.label))
        json.dump({"logged": logged, "direct": direct, "world": trainer.world_size}, open(out, "w"))
    """
)


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, PL_TORCH_DISTRIBUTED_BACKEND="gloo", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2
    assert abs(result["logged"] - result["direct"]) < 1e-9, result
