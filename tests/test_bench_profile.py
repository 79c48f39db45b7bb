"""The profile's kernel-by-kind table: names map to the part of the forward they compute, and the
per-forward counts of a real CPU profile match the model's structure."""

from __future__ import annotations

import pytest
import torch

from mormm.backbone import fused
from mormm.bench import kinds
from mormm.bench.profile import main as profile


@pytest.mark.parametrize("name, kind", [
    # kernel names in the forms the H200 profiles print (cuBLAS, cuDNN, inductor, mormm's Triton)
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1", "attention"),
    ("triton_poi_fused_gelu_view_5", "gelu"),
    ("triton_poi_fused__to_copy_gelu_view_7", "gelu"),  # the GELU, not the cast it fused
    ("triton_per_fused__to_copy_add_native_layer_norm_3", "layer norm"),
    ("triton_poi_fused_add_cat_flip_index_mul_9", "rotary apply"),
    # compiled: the kernel that lays out SDPA's inputs carries the attention op in its name (the
    # H200 profile printed it cut at `..._cudnn_attention__to_`); it is the rotary apply and
    # cast of q, k, v, not attention
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_cat_flip_mul_6",
     "rotary apply"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_8", "cast"),
    ("triton_poi_fused_cat_cos_neg_sin_stack_1", "rotary table"),
    ("_merge_rows", "merge"),
    ("triton_poi_fused_lerp_scatter_4", "merge"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "top-k"),
    ("_gather_rows", "gather / scatter"),
    ("void at::native::_scatter_gather_elementwise_kernel<128, 8>", "gather / scatter"),
    ("triton_poi_fused__to_copy_12", "cast"),
    ("triton_poi_fused__to_copy_add_2", "other"),  # a cast fused with an add is not a cast
    ("Memset (Device)", "memset / memcpy"),
    # aten ops, on the CPU
    ("aten::addmm", "matmul"),
    ("aten::linear", "other"),  # the dispatching wrapper: its addmm holds the work
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_layer_norm", "layer norm"),
    ("aten::_to_copy", "cast"),
    ("aten::view", "other"),
])
def test_kernel_names_map_to_their_kind(name, kind):
    assert kinds.kernel_kind(name) == kind


def test_by_kind_sums_per_forward_in_table_order():
    table = kinds.by_kind([("aten::gelu", 30.0, 6), ("nvjet_a", 60.0, 3), ("nvjet_b", 30.0, 3),
                           ("aten::view", 3.0, 9)], forwards=3)
    assert table == {"matmul": (30.0, 2.0), "gelu": (10.0, 2.0), "other": (1.0, 3.0)}
    assert list(table) == ["matmul", "gelu", "other"]
    md = kinds.markdown({"vanilla": table, "mor_ec": {"matmul": (15.0, 2.0)}}, scale=1.5)
    assert "| matmul | 30.0 (2) | 15.0 (2) | -5.0 |" in md
    assert "| gelu | 10.0 (2) | 0.0 (0) | -6.7 |" in md
    assert "| all | 41.0 (7) | 15.0 (2) | -12.3 |" in md
    # a CPU wrapper op counts no calls, but its self time still belongs to its kind
    assert kinds.by_kind([("aten::layer_norm", 6.0, 0)], forwards=3) == {"layer norm": (2.0, 0.0)}


def test_cpu_profile_counts_each_layers_kernels_once_per_forward(capsys):
    tables = profile(["--device", "cpu", "--small", "--shape", "audio1s", "--batch", "1",
                      "--variants", "vanilla,mor_ec", "--by-kind", "--top", "3"])
    vanilla, mor = tables["vanilla"], tables["mor_ec"]
    # 12 effective layers in both: one attention each, two layer norms each plus the final one
    for table in (vanilla, mor):
        assert table["attention"][1] == 12 and table["layer norm"][1] == 25
    assert vanilla["matmul"][1] == 12 * 4  # qkv, proj, fc1, fc2; wrappers not counted again
    # capacities 1, 3/4, 1/2, 1/4: steps 1-3 select their tokens, step 0 takes all
    assert mor["top-k"][1] == 3 and "top-k" not in vanilla
    out = capsys.readouterr().out
    assert "| kind | vanilla | mor_ec | mor_ec - vanilla / 1.6 |" in out


def test_profile_names_an_unknown_shape_or_variant(capsys):
    with pytest.raises(SystemExit):
        profile(["--device", "cpu", "--small", "--shape", "vidoe"])
    assert "--shape: unknown 'vidoe'; choose from video,audio10s,audio1s,image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile(["--device", "cpu", "--small", "--variants", "vanilla,mor"])
    assert "--variants: unknown 'mor'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile(["--device", "cpu", "--small", "--batch", "0"])
    assert "--batch 0: give at least 1 clip per batch" in capsys.readouterr().err


def test_profile_without_fused_merges_shows_the_unfused_ops():
    """--no-fused-merge builds the models with BackboneConfig.fused_merge off: each of the four
    routed steps ends in an aten lerp. Fused, the step ends in the Triton kernel, which on the
    CPU runs in Triton's interpreter (tests/conftest.py), outside the aten ops profiled."""
    args = ["--device", "cpu", "--small", "--shape", "audio1s", "--batch", "1",
            "--variants", "mor_ec", "--top", "1"]
    unfused = profile(args + ["--no-fused-merge"])["mor_ec"]
    assert unfused["merge"][1] == 4
    fused_table = profile(args)["mor_ec"]
    if fused.runs_on(torch.zeros(1)):
        assert "merge" not in fused_table
    else:
        assert fused_table["merge"][1] == 4
