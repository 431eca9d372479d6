"""benchmarks/uniter_step.py: our tiny model and UNITER's original code (from UNITER_SRC, skipped when unset)
give the same encoder outputs, losses and gradients on the same padded batch (UNITER's gather layout)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "uniter_step.py"


@pytest.fixture
def bench():
    """The benchmark module; modules it adds to sys.modules (the apex shim, UNITER's package) are removed."""
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("uniter_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_not_a_checkout_is_one_line_error(bench, tmp_path):
    with pytest.raises(SystemExit, match="is not a UNITER checkout"):
        bench.load_uniter(tmp_path)


@pytest.mark.skipif(not os.environ.get("UNITER_SRC"), reason="UNITER_SRC (a UNITER checkout) is not set")
def test_same_outputs_losses_and_gradients(bench):
    uniter_config, uniter_pretraining = bench.load_uniter(Path(os.environ["UNITER_SRC"]))
    torch.manual_seed(0)
    ours, weights = bench.build_ours("tiny")
    c = ours.encoder.config
    uniter = uniter_pretraining(
        uniter_config(c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size),
        bench.IMG_DIM, bench.LABEL_DIM)
    mapping = bench.weight_map(c.num_hidden_layers)
    bench.copy_weights(ours, uniter, mapping)
    batches = bench.prepare_batches(ours, "padded", 4, seed=3)
    try:
        bench.check_equal(ours, weights, uniter, mapping, batches, "tiny/padded")
    except SystemExit as err:
        pytest.fail(str(err))
