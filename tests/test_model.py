"""UNITER encoder: shapes, padding, attention, region masking, checkpoints, presets, bf16, BERT init."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import BertConfig, BertModel

from vlp.model import UniterConfig, UniterModel, init_from_bert

SMALL = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=24,
    img_dim=12,
)


def small_model(**overrides) -> UniterModel:
    torch.manual_seed(0)
    return UniterModel(UniterConfig(**{**SMALL, **overrides})).eval()


def make_batch(text_lens: list[int], regions: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Contract layout: each modality padded at its end, pad id 0, positions arange."""
    gen = torch.Generator().manual_seed(seed)
    b, lt, n = len(text_lens), max(text_lens, default=0), max(regions, default=0)
    txt_mask = torch.arange(lt) < torch.tensor(text_lens)[:, None]
    img_mask = torch.arange(n) < torch.tensor(regions)[:, None]
    return {
        "input_ids": torch.randint(1, 60, (b, lt), generator=gen).masked_fill(~txt_mask, 0),
        "position_ids": torch.arange(lt).expand(b, lt),
        "txt_mask": txt_mask,
        "img_feat": torch.randn(b, n, 12, generator=gen) * img_mask[..., None],
        "img_pos_feat": torch.rand(b, n, 7, generator=gen) * img_mask[..., None],
        "img_mask": img_mask,
    }


def key_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([batch["txt_mask"], batch["img_mask"]], dim=1)


@pytest.mark.parametrize(
    ("text_lens", "regions", "length"),
    [([5, 3], [4, 6], 11), ([5, 3], [0, 0], 5), ([0, 0], [4, 6], 6)],
    ids=["text+image", "text-only", "image-only"],
)
def test_output_shapes_and_gradients(text_lens, regions, length):
    model = small_model().train()
    out = model(**make_batch(text_lens, regions))
    assert out.sequence_output.shape == (2, length, 32)
    assert out.attention is None
    pooled = model.pool(out.sequence_output)
    assert pooled.shape == (2, 32)
    pooled.sum().backward()
    assert model.encoder.layers[0].qkv.weight.grad.abs().sum() > 0


def test_padding_changes_no_real_output_and_padded_outputs_are_zero():
    model = small_model()
    batch = make_batch([5, 3], [4, 6])
    # 3 more text and 2 more region slots, filled with junk that the masks must hide.
    gen = torch.Generator().manual_seed(1)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.randint(1, 60, (2, 3), generator=gen)], 1),
        "position_ids": torch.arange(8).expand(2, 8),
        "txt_mask": torch.cat([batch["txt_mask"], torch.zeros(2, 3, dtype=torch.bool)], 1),
        "img_feat": torch.cat([batch["img_feat"], torch.randn(2, 2, 12, generator=gen)], 1),
        "img_pos_feat": torch.cat([batch["img_pos_feat"], torch.rand(2, 2, 7, generator=gen)], 1),
        "img_mask": torch.cat([batch["img_mask"], torch.zeros(2, 2, dtype=torch.bool)], 1),
    }
    short = model(**batch).sequence_output
    long = model(**padded).sequence_output
    real = key_mask(batch)
    long_real = torch.cat([long[:, :5], long[:, 8:14]], 1)  # drop the added slots
    torch.testing.assert_close(long_real[real], short[real], atol=1e-5, rtol=0)
    assert long[~key_mask(padded)].abs().max() == 0
    assert short[~real].abs().max() == 0


def test_attention_probabilities_are_the_ones_the_layer_uses():
    model = small_model()
    batch = make_batch([5, 3], [4, 6])
    layer = model.encoder.layers[1]
    seen = {}
    hook = layer.register_forward_hook(lambda _mod, args, out: seen.update(args=args, out=out[0]))
    out = model(**batch, attn_layer=1)
    hook.remove()
    probs, real = out.attention, key_mask(batch)
    assert probs.shape == (2, 4, 11, 11) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 11), atol=1e-6, rtol=0)
    assert (probs.masked_select(~real[:, None, None, :]) == 0).all()
    assert (probs.masked_select(real[:, None, None, :]) > 0).all()

    # The explicit path computes exactly what SDPA computes in the other layers.
    plain = model(**batch)
    torch.testing.assert_close(out.sequence_output, plain.sequence_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(**batch, attn_layer=-1).attention, probs, atol=0, rtol=0)

    # Attention with the returned probabilities, then the rest of the layer, gives the layer's output.
    packed, flat_index = seen["args"][:2]
    with torch.no_grad():
        value = layer.qkv(packed)[:, 64:]  # fused projection: query, key, value stacked
        value = value.new_zeros(22, 32).index_copy(0, flat_index, value).view(2, 11, 4, 8).transpose(1, 2)
        context = (probs @ value).transpose(1, 2).reshape(22, 32)[flat_index]
        hidden = layer.attn_norm(packed + layer.attn_out(context))
        hidden = layer.ffn_norm(hidden + layer.ffn_out(F.gelu(layer.ffn_in(hidden))))
    torch.testing.assert_close(hidden, seen["out"], atol=1e-5, rtol=0)

    # A loss on the probabilities (IAIS) trains the layer's projections.
    out.attention[:, :, :, 0].sum().backward()
    assert layer.qkv.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="attn_layer 2 is out of range for 2 layers"):
        model(**batch, attn_layer=2)


def test_masked_regions_have_their_features_zeroed():
    model = small_model()
    batch = make_batch([5, 3], [4, 6])
    original = batch["img_feat"].clone()
    img_masked = torch.zeros(2, 6, dtype=torch.bool)
    img_masked[0, 1] = img_masked[1, 4] = True
    masked = model(**batch, img_masked=img_masked).sequence_output
    zeroed = dict(batch, img_feat=batch["img_feat"].masked_fill(img_masked[..., None], 0.0))
    torch.testing.assert_close(masked, model(**zeroed).sequence_output, atol=0, rtol=0)
    assert not torch.allclose(masked, model(**batch).sequence_output, atol=1e-3)
    assert torch.equal(batch["img_feat"], original)


def test_masked_regions_get_the_learned_mask_vector_with_img_mask_embedding():
    # The official code's option: a masked region's feature is zeros + row 1 of a learned table (row 0 zero).
    model = small_model(img_mask_embedding=True)
    table = model.img_embeddings.mask_embedding.weight
    assert table.shape == (2, model.config.img_dim) and table[0].abs().sum() == 0 and table[1].abs().sum() > 0
    batch = make_batch([5, 3], [4, 6])
    img_masked = torch.zeros(2, 6, dtype=torch.bool)
    img_masked[0, 1] = img_masked[1, 4] = True
    masked = model(**batch, img_masked=img_masked).sequence_output
    replaced = batch["img_feat"].clone()
    replaced[img_masked] = table[1].detach()
    expected = model(**dict(batch, img_feat=replaced)).sequence_output
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)
    masked.sum().backward()
    assert table.grad[1].abs().sum() > 0 and table.grad[0].abs().sum() == 0
    # Unmasked inputs never see it; the default model has no such table.
    assert small_model().img_embeddings.mask_embedding is None


def test_default_type_ids_are_text_0_and_image_1():
    model = small_model()
    batch = make_batch([5, 3], [4, 6])
    explicit = model(
        **batch,
        txt_type_ids=torch.zeros(2, 5, dtype=torch.long),
        img_type_ids=torch.ones(2, 6, dtype=torch.long),
    )
    torch.testing.assert_close(model(**batch).sequence_output, explicit.sequence_output, atol=1e-6, rtol=0)


def test_save_and_load_round_trip(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UniterModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    batch = make_batch([5, 3], [4, 6])
    assert torch.equal(loaded(**batch).sequence_output, model(**batch).sequence_output)


def test_load_errors_name_the_file(tmp_path):
    small_model().save_pretrained(tmp_path / "a")
    small_model(intermediate_size=40).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.pt").replace(tmp_path / "b" / "model.pt")
    with pytest.raises(ValueError, match=r"a/model.pt: model weights are missing"):
        UniterModel.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"b/model.pt: encoder.layers.0.ffn_in.weight has shape \(48, 32\)"):
        UniterModel.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text('{"hidden_size": 32, "num_heads": 4}')
    with pytest.raises(ValueError, match=r"b/config.json: unknown field 'num_heads'"):
        UniterModel.from_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "b" / "config.json").write_text(small_model().config.model_dump_json())
    with pytest.raises(ValueError, match=r"b/model.pt: cannot read the weights") as err:
        UniterModel.from_pretrained(tmp_path / "b")
    assert "\n" not in str(err.value)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_preset_sizes_and_parameter_counts():
    tiny = UniterConfig.preset("tiny", img_dim=512, vocab_size=1000)
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.intermediate_size) == (
        4,
        256,
        4,
        1024,
    )
    assert tiny.img_dim == 512 and UniterConfig.preset("base").img_dim == 2048
    with torch.device("meta"):  # shapes only: no memory, no init time
        assert _count(UniterModel(tiny)) == 3_747_840
        for name, bert_size in (("base", 109_482_240), ("large", 335_141_888)):
            config = UniterConfig.preset(name)
            h = config.hidden_size
            bert = BertModel(
                BertConfig(
                    hidden_size=h,
                    num_hidden_layers=config.num_hidden_layers,
                    num_attention_heads=config.num_attention_heads,
                    intermediate_size=config.intermediate_size,
                )
            )
            assert _count(bert) == bert_size  # BERT-base / BERT-large uncased, pooler included
            image_embedder = (2048 + 1) * h + (7 + 1) * h + 3 * 2 * h  # two FCs, three LayerNorms
            assert _count(UniterModel(config)) == bert_size + image_embedder


def test_bf16_autocast():
    model = small_model().train()
    batch = make_batch([5, 3], [4, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, attn_layer=0)
        loss = model.pool(out.sequence_output).float().square().mean()
    loss.backward()
    assert torch.isfinite(out.sequence_output).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.attention.dtype == torch.float32
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 4, 11), atol=1e-5, rtol=0)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(**batch).sequence_output.float()
    full = model(**batch).sequence_output
    assert (low - full).abs().max() < 0.1


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=24,
        )
    )
    with torch.no_grad():  # far from BERT's near-identity init, so any mis-mapped weight shows
        for param in bert.parameters():
            param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(path)
    return path, bert.eval()


def test_init_from_bert_computes_what_bert_computes(bert_dir):
    path, bert = bert_dir
    model = small_model()
    init_from_bert(model, path)
    batch = make_batch([7, 4, 1], [0, 0, 0], seed=3)
    ours = model(**batch).sequence_output
    theirs = bert(input_ids=batch["input_ids"], attention_mask=batch["txt_mask"].long())
    real = batch["txt_mask"]
    torch.testing.assert_close(ours[real], theirs.last_hidden_state[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pool(ours), theirs.pooler_output, atol=1e-5, rtol=0)
    # The image embedder keeps its own initialisation and still runs on top.
    assert model(**make_batch([7, 4, 1], [3, 0, 2])).sequence_output.shape == (3, 10, 32)


def test_init_from_bert_errors(bert_dir):
    path, _ = bert_dir
    with pytest.raises(ValueError, match="BERT checkpoint 'bert-base-uncased': not a local directory"):
        init_from_bert(small_model(), "bert-base-uncased")
    with pytest.raises(ValueError, match="num_attention_heads is 4, the UniterConfig has 2"):
        init_from_bert(small_model(num_attention_heads=2), path)
    with pytest.raises(ValueError, match="num_hidden_layers is 2, the UniterConfig has 3"):
        init_from_bert(small_model(num_hidden_layers=3), path)
    with pytest.raises(
        ValueError, match=r"embeddings.word_embeddings.weight has shape \(60, 32\) but .* needs \(61, 32\)"
    ) as err:
        init_from_bert(small_model(vocab_size=61), path)
    assert "\n" not in str(err.value)


def test_bad_config_and_inputs():
    with pytest.raises(ValidationError, match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        UniterConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        UniterConfig(hidden_act="relu")
    with pytest.raises(ValueError, match=r"unknown UNITER preset 'huge' \(choose one of tiny, base, large\)"):
        UniterConfig.preset("huge")
    with pytest.raises(ValueError, match=r"^UNITER preset 'tiny': unknown field 'hidden'$"):
        UniterConfig.preset("tiny", hidden=3)
    with pytest.raises(ValidationError):
        small_model().config.hidden_size = 64  # frozen: the weights were built for the old size

    model = small_model()
    batch = make_batch([5, 3], [4, 6])
    with pytest.raises(ValueError, match=r"img_feat has shape \(2, 6, 13\), expected \(2, 6, 12\)"):
        model(**dict(batch, img_feat=torch.zeros(2, 6, 13)))
    with pytest.raises(ValueError, match=r"img_mask has shape \(2, 5\), expected \(2, 6\)"):
        model(**dict(batch, img_mask=batch["img_mask"][:, :5]))
    long = make_batch([25], [2])
    with pytest.raises(ValueError, match="25 positions, more than max_position_embeddings 24"):
        model(**long)
    with pytest.raises(ValueError, match="no text positions and no regions"):
        model(**make_batch([0], [0]))
