"""The model-agnostic default pruning rule and --include/--exclude globs on realistic parameter names."""

from __future__ import annotations

import pytest
import torch

from dsnn_compress.core.selection import is_default_prunable, select_prunable
from dsnn_compress.errors import UsageError

SHAPES: dict[str, tuple[int, ...]] = {
    # conformer-like
    "encoder.subsampling.conv.0.weight": (8, 1, 3, 3),
    "encoder.subsampling.conv.0.bias": (8,),
    "encoder.subsampling.out.weight": (16, 24),
    "encoder.pos_enc.pe": (1, 50, 16),
    "encoder.layers.0.ffn1.layer_norm.weight": (16,),
    "encoder.layers.0.ffn1.linear1.weight": (64, 16),
    "encoder.layers.0.ffn1.linear1.bias": (64,),
    "encoder.layers.0.ffn1.linear2.weight": (16, 64),
    "encoder.layers.0.self_attn.linear_q.weight": (16, 16),
    "encoder.layers.0.self_attn.linear_pos.weight": (16, 16),
    "encoder.layers.0.self_attn.pos_bias_u": (4, 4),
    "encoder.layers.0.conv.pointwise_conv1.weight": (32, 16, 1),
    "encoder.layers.0.conv.depthwise_conv.weight": (16, 1, 15),
    "encoder.layers.0.conv.batch_norm.weight": (16,),
    "encoder.layers.0.conv.batch_norm.running_var": (16,),
    "encoder.layers.0.conv.batch_norm.num_batches_tracked": (),
    "encoder.layers.0.norm_final.weight": (16,),
    "encoder.layers.0.ln2.weight": (16, 16),  # a 2-D "norm" is still a norm
    # LSTM, both directions and two layers
    "lstm.weight_ih_l0": (32, 16),
    "lstm.weight_hh_l0": (32, 8),
    "lstm.weight_ih_l0_reverse": (32, 16),
    "lstm.weight_hh_l0_reverse": (32, 8),
    "lstm.weight_ih_l1": (32, 16),
    "lstm.bias_ih_l0": (32,),
    "lstm.bias_hh_l0_reverse": (32,),
    # wav2vec2-like
    "wav2vec2.masked_spec_embed": (16,),
    "wav2vec2.feature_extractor.conv_layers.0.conv.weight": (8, 1, 10),
    "wav2vec2.feature_extractor.conv_layers.0.layer_norm.weight": (8,),
    "wav2vec2.feature_projection.layer_norm.weight": (8,),
    "wav2vec2.feature_projection.projection.weight": (16, 8),
    "wav2vec2.encoder.pos_conv_embed.conv.bias": (16,),
    "wav2vec2.encoder.pos_conv_embed.conv.weight_g": (1, 1, 128),
    "wav2vec2.encoder.pos_conv_embed.conv.weight_v": (16, 1, 128),
    "wav2vec2.encoder.layer_norm.weight": (16,),
    "wav2vec2.encoder.layers.0.attention.k_proj.weight": (16, 16),
    "wav2vec2.encoder.layers.0.attention.out_proj.weight": (16, 16),
    "wav2vec2.encoder.layers.0.layer_norm.weight": (16,),
    "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight": (32, 16),
    "wav2vec2.encoder.layers.0.final_layer_norm.weight": (16,),
    "wav2vec2.encoder.layers.0.final_layer_norm.bias": (16,),
    "wav2vec2.encoder.layers.1.attention.q_proj.parametrizations.weight.original0": (16, 16),
    # heads and embeddings
    "lm_head.weight": (32, 16),
    "lm_head.bias": (32,),
    "proj_out.weight": (32, 16),
    "ctc.weight": (32, 16),
    "classifier.weight": (4, 16),
    "decoder.embed_tokens.weight": (32, 16),
    "decoder.layers.0.fc1.weight": (64, 16),
    "decoder.layernorm_embedding.weight": (16,),
}

EXPECTED_DEFAULT = {
    "decoder.layers.0.fc1.weight",
    "encoder.layers.0.conv.depthwise_conv.weight",
    "encoder.layers.0.conv.pointwise_conv1.weight",
    "encoder.layers.0.ffn1.linear1.weight",
    "encoder.layers.0.ffn1.linear2.weight",
    "encoder.layers.0.self_attn.linear_pos.weight",
    "encoder.layers.0.self_attn.linear_q.weight",
    "encoder.subsampling.conv.0.weight",
    "encoder.subsampling.out.weight",
    "lstm.weight_hh_l0",
    "lstm.weight_hh_l0_reverse",
    "lstm.weight_ih_l0",
    "lstm.weight_ih_l0_reverse",
    "lstm.weight_ih_l1",
    "wav2vec2.encoder.layers.0.attention.k_proj.weight",
    "wav2vec2.encoder.layers.0.attention.out_proj.weight",
    "wav2vec2.encoder.layers.0.feed_forward.intermediate_dense.weight",
    "wav2vec2.feature_extractor.conv_layers.0.conv.weight",
    "wav2vec2.feature_projection.projection.weight",
}


def make_tensors() -> dict[str, torch.Tensor]:
    tensors = {name: torch.ones(shape) for name, shape in SHAPES.items()}
    tensors["encoder.layers.0.conv.batch_norm.num_batches_tracked"] = torch.tensor(3, dtype=torch.int64)
    tensors["int_table.weight"] = torch.ones(4, 4, dtype=torch.int64)
    return tensors


def test_default_rule_on_realistic_names() -> None:
    tensors = make_tensors()
    chosen = {name for name, t in tensors.items() if is_default_prunable(name, t)}
    assert chosen == EXPECTED_DEFAULT
    assert select_prunable(tensors) == sorted(EXPECTED_DEFAULT)


def test_default_rule_needs_two_dimensional_float_weights() -> None:
    assert is_default_prunable("enc.linear.weight", torch.ones(3, 3))
    assert is_default_prunable("enc.linear.weight", torch.ones(3, 3, dtype=torch.float16))
    assert not is_default_prunable("enc.linear.weight", torch.ones(3))
    assert not is_default_prunable("enc.linear.weight", torch.ones(3, 3, dtype=torch.int8))
    assert not is_default_prunable("lstm.weight_ih_l0_reverse_extra", torch.ones(3, 3))
    assert not is_default_prunable("encoder.ctc.weight", torch.ones(3, 3))
    assert is_default_prunable("ctc_like.weight", torch.ones(3, 3))  # only exact head module names


def test_include_replaces_defaults_and_can_select_a_head() -> None:
    tensors = make_tensors()
    chosen = select_prunable(tensors, include=["lm_head.*", "lstm.*"])
    # 1-D biases and the int64 buffer matched by the globs are skipped silently.
    assert chosen == [
        "lm_head.weight",
        "lstm.weight_hh_l0",
        "lstm.weight_hh_l0_reverse",
        "lstm.weight_ih_l0",
        "lstm.weight_ih_l0_reverse",
        "lstm.weight_ih_l1",
    ]


def test_exclude_removes_from_defaults() -> None:
    tensors = make_tensors()
    chosen = select_prunable(tensors, exclude=["wav2vec2.*", "*_reverse", "encoder.layers.0.conv.*"])
    assert chosen == [
        "decoder.layers.0.fc1.weight",
        "encoder.layers.0.ffn1.linear1.weight",
        "encoder.layers.0.ffn1.linear2.weight",
        "encoder.layers.0.self_attn.linear_pos.weight",
        "encoder.layers.0.self_attn.linear_q.weight",
        "encoder.subsampling.conv.0.weight",
        "encoder.subsampling.out.weight",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l0",
        "lstm.weight_ih_l1",
    ]


def test_include_then_exclude() -> None:
    tensors = make_tensors()
    chosen = select_prunable(tensors, include=["encoder.layers.0.*"], exclude=["*.ln2.*", "*conv*"])
    assert chosen == [
        "encoder.layers.0.ffn1.linear1.weight",
        "encoder.layers.0.ffn1.linear2.weight",
        "encoder.layers.0.self_attn.linear_pos.weight",
        "encoder.layers.0.self_attn.linear_q.weight",
        "encoder.layers.0.self_attn.pos_bias_u",
    ]


def test_globs_are_case_sensitive_full_name_matches() -> None:
    tensors = make_tensors()
    with pytest.raises(UsageError, match="matches no parameter"):
        select_prunable(tensors, include=["LSTM.*"])
    with pytest.raises(UsageError, match="matches no parameter"):
        select_prunable(tensors, exclude=["weight_ih_l0"])  # not anchored to the full name


@pytest.mark.parametrize(("include", "exclude"), [(["nope.*"], []), ([], ["lstm.*", "missing"])])
def test_unmatched_pattern_is_usage_error(include: list[str], exclude: list[str]) -> None:
    with pytest.raises(UsageError, match="matches no parameter") as info:
        select_prunable(make_tensors(), include=include, exclude=exclude)
    assert info.value.exit_code == 2
    assert (include or exclude)[-1] in info.value.message


def test_nothing_left_is_usage_error() -> None:
    with pytest.raises(UsageError, match="nothing left to prune"):
        select_prunable(make_tensors(), exclude=["*"])
    with pytest.raises(UsageError, match="nothing left to prune"):
        select_prunable(make_tensors(), include=["lstm.weight_ih_l0"], exclude=["lstm.*"])
    with pytest.raises(UsageError, match="cannot be pruned"):
        select_prunable(make_tensors(), include=["*.bias"])
    only_norms = {"a.layer_norm.weight": torch.ones(4), "lm_head.weight": torch.ones(4, 4)}
    with pytest.raises(UsageError, match="nothing left to prune"):
        select_prunable(only_norms)


def test_model_defaults_list() -> None:
    tensors = make_tensors()
    assert select_prunable(tensors, defaults=["lm_head.weight", "ctc.weight"], exclude=["ctc.*"]) == ["lm_head.weight"]
    with pytest.raises(UsageError, match="lacks"):
        select_prunable(tensors, defaults=["not.there.weight"])


def test_multihead_attention_packed_projection_is_prunable_by_default() -> None:
    """``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight``; its out projection is a Linear."""
    attention = torch.nn.MultiheadAttention(16, 2)
    tensors = {f"encoder.self_attn.{k}": v for k, v in attention.state_dict().items()}
    assert select_prunable(tensors) == ["encoder.self_attn.in_proj_weight", "encoder.self_attn.out_proj.weight"]
