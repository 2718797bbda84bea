"""Multi-node sampling: two simulated nodes on localhost (torchrun --nnodes=2, one process
each, a static rendezvous) give the tokens a single process gives for the same batches."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import softcfg_patch as sp
from softcfg_patch.run import runner
from conftest import ROOT


@pytest.mark.e2e
def test_two_nodes_on_localhost_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
         str(ROOT / "alitok" / "sample_imagenet.py"), "--config", "tests/configs/alitok_tiny.yaml",
         f"--experiment.output_dir={out}", "--sample.num_fid_samples=4", "--sample.per_proc_batch_size=2",
         "--sample.tokens_only=True", "--model.generator.softcfg_strength=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err
    with np.load(f"{out}_tokens.npz") as npz:
        tokens, labels = npz["tokens"], npz["labels"]
    assert tokens.shape == (4, 273) and list(labels) == [0, 1, 2, 3]

    config = OmegaConf.load(ROOT / "tests" / "configs" / "alitok_tiny.yaml")
    from alitok.model import ARModel
    model = ARModel(config).eval()
    model.load_state_dict(load_file(ROOT / config.experiment.generator_checkpoint))
    g = sp.Guidance(guidance_scale=3.0, guidance_scale_pow=1.0, softcfg_strength=1.0)
    for k in (0, 1):  # batch k ran on node k; one process draws it from the same seed
        gen = torch.Generator().manual_seed(runner.batch_seed(0, k))
        one = sp.generate(model, torch.tensor([2 * k, 2 * k + 1]), g, generator=gen)
        assert np.array_equal(tokens[2 * k:2 * k + 2], one.numpy())
