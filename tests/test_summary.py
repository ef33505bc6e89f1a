import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import bnnjax
import bnnjax.zoo
from bnnjax import layers as L
from bnnjax.models import LarqTutorialCNN


def test_seed000_summary_matches_larq():
    printed = []
    r = bnnjax.summary(LarqTutorialCNN(), jnp.zeros((1, 28, 28, 1)), print_fn=printed.append)
    # figures printed by Larq 0.14's lq.models.summary for the same model
    assert r["params_by_bits"] == {1: 93088, 32: 468}
    assert r["macs_by_bits"] == {1: 2599552, 32: 194688}
    assert f"{r['memory_kib']:.2f}" == "13.19"
    assert f"{r['float32_kib']:.2f}" == "365.45"
    assert f"{r['memory_8bit_kib']:.2f}" == "11.82"
    assert f"{r['binarized_mac_ratio']:.4f}" == "0.9303"
    assert (r["trainable_params"], r["non_trainable_params"]) == (93088, 468)
    text = printed[0]
    for s in ["13.19 KiB", "365.45 KiB", "11.82 KiB", "0.9303", "93088", "2599552", "194688", "(-1, 26, 26, 32)"]:
        assert s in text
    assert [l["name"] for l in r["layers"]][:2] == ["QuantConv_0", "BatchNorm_0"]
    assert r["layers"][0]["input_precision"] is None and r["layers"][2]["input_precision"] == 1


def test_batch_norm_counts_two_per_channel_and_float_layers_count_32_bit():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(4)(x.reshape((x.shape[0], -1)))

    r = bnnjax.summary(M(), jnp.zeros((2, 6, 6, 3)), print_fn=None)
    bn = r["layers"][1]
    assert bn["params_by_bits"] == {32: 16} and bn["trainable"] == 0
    assert r["params_by_bits"] == {32: 3 * 3 * 3 * 8 + 8 + 16 + 6 * 6 * 8 * 4 + 4}
    assert r["macs_by_bits"] == {32: 27 * 8 * 36 + 288 * 4}
    assert r["binarized_mac_ratio"] == 0.0


def test_summary_of_depthwise_and_abc_layers():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = L.QuantDepthwiseConv2D((3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                       use_bias=False)(x)
            return L.ABCConv(4, (3, 3), num_weight_bases=3, num_act_bases=2, use_bias=False)(x)

    r = bnnjax.summary(M(), jnp.zeros((1, 5, 5, 2)), print_fn=None)
    assert r["layers"][0]["macs_by_bits"] == {1: 9 * 2 * 25}
    abc = r["layers"][1]
    assert abc["params_by_bits"] == {3: 72, 32: 4}  # kernel stored as 3 bases; 2 shifts + 2 betas
    assert abc["macs_by_bits"] == {3: 72 * 25 * 3 * 2}


# lq.models.summary of larq-zoo 2.4's models (Larq 0.14), its second table, as printed
LARQ_ZOO_SUMMARIES = {
    "QuickNet": ["13.2 M", "13.2 M", "13.7 k", "4.17 MiB", "2.16 MiB", "50.48 MiB", "0.08", "1.88 B",
                 "Ratio of MACs that are binarized 0.9842"],
    "DoReFaNet": ["62.4 M", "62.4 M", "18.9 k", "22.80 MiB", "10.91 MiB", "238.02 MiB", "0.10", "3.05 B",
                  "Ratio of MACs that are ternarized 0.9590"],
}


@pytest.mark.parametrize("name", sorted(LARQ_ZOO_SUMMARIES))
def test_zoo_model_summaries_print_larqs_figures(name):
    printed = []
    bnnjax.summary(bnnjax.zoo.MODELS[name](), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
                   print_fn=printed.append)
    rows = [" ".join(line.strip("| ").split()) for line in printed[0].split("summary-")[-1].splitlines()
            if line.startswith("|")]
    labels = ["Total params", "Trainable params", "Non-trainable params", "Model size",
              "Model size (8-bit FP weights)", "Float-32 Equivalent", "Compression Ratio of Memory", "Number of MACs"]
    assert rows == [f"{l} {v}" for l, v in zip(labels, LARQ_ZOO_SUMMARIES[name])] + LARQ_ZOO_SUMMARIES[name][-1:]
