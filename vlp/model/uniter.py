"""UNITER: one transformer over [text tokens ; image regions], each block padded at its end."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vlp.model.config import UniterConfig
from vlp.model.embeddings import ImageEmbeddings, TextEmbeddings
from vlp.model.encoder import Encoder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


class UniterOutput(NamedTuple):
    # [B, Lt + N, H]: text outputs are [:, :Lt], region outputs [:, Lt:]; padded positions are zeros.
    sequence_output: Tensor
    # fp32 [B, heads, Lt + N (queries), Lt + N (keys)] of the requested layer, else None; padded keys get
    # probability 0, and the rows of padded queries carry no meaning (mask them like their outputs).
    attention: Tensor | None


def _rows(values: Tensor | None, rows: tuple[Tensor, Tensor]) -> Tensor | None:
    return None if values is None else values[rows]


class UniterModel(nn.Module):
    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation: N(0, initializer_range) weights, zero biases, identity LayerNorms.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        txt_mask: Tensor,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        img_mask: Tensor,
        img_masked: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        attn_layer: int | None = None,
        depth: int | None = None,
    ) -> UniterOutput:
        """Encode a batch; Lt = 0 (image only) and N = 0 (text only) are allowed.

        input_ids, position_ids Long[B, Lt]; txt_mask Bool[B, Lt]; img_feat [B, N, img_dim];
        img_pos_feat [B, N, pos_dim]; img_mask Bool[B, N]; img_masked Bool[B, N] zeroes those regions'
        features; attn_layer (negative counts from the end) also returns that layer's attention; depth runs
        the first `depth` layers only (``config.fusion_start``: the unimodal features of align-before-fuse).
        """
        self._check_shapes(input_ids, position_ids, txt_mask, img_feat, img_pos_feat, img_mask)
        txt_mask, img_mask = txt_mask.bool(), img_mask.bool()
        # Only attention needs the padded layout: everything else runs on the real positions alone, text
        # rows then region rows, and `real` is each row's index in the flattened [B, Lt + N] sequence.
        txt_rows, img_rows = txt_mask.nonzero(as_tuple=True), img_mask.nonzero(as_tuple=True)
        text = self.embeddings(input_ids[txt_rows], position_ids[txt_rows], _rows(txt_type_ids, txt_rows))
        image = self.img_embeddings(
            img_feat[img_rows],
            img_pos_feat[img_rows],
            self.embeddings.token_type_embeddings,
            _rows(img_type_ids, img_rows),
            _rows(img_masked, img_rows),
        )
        text_len, length = txt_mask.shape[1], txt_mask.shape[1] + img_mask.shape[1]
        real = torch.cat([txt_rows[0] * length + txt_rows[1], img_rows[0] * length + text_len + img_rows[1]])
        packed = torch.cat([text, image])
        key_mask = torch.cat([txt_mask, img_mask], dim=1)
        sequence_output, attention = self.encoder(packed, real, key_mask, attn_layer, text_len, depth)
        return UniterOutput(sequence_output, attention)

    def pool(self, sequence_output: Tensor) -> Tensor:
        """BERT's pooler: tanh(FC) of position 0 ([CLS], or the first region when there is no text)."""
        return torch.tanh(self.pooler(sequence_output[:, 0]))

    def _check_shapes(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        txt_mask: Tensor,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        img_mask: Tensor,
    ) -> None:
        config = self.config
        if input_ids.dim() != 2 or img_feat.dim() != 3:
            raise ValueError(
                f"UniterModel inputs input_ids [B, Lt] and img_feat [B, N, D] have shapes "
                f"{tuple(input_ids.shape)} and {tuple(img_feat.shape)}"
            )
        batch, text_len = input_ids.shape
        num_regions = img_feat.shape[1]
        expected = {
            "position_ids": (position_ids, (batch, text_len)),
            "txt_mask": (txt_mask, (batch, text_len)),
            "img_feat": (img_feat, (batch, num_regions, config.img_dim)),
            "img_pos_feat": (img_pos_feat, (batch, num_regions, config.pos_dim)),
            "img_mask": (img_mask, (batch, num_regions)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"UniterModel input {name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"(batch {batch}, {text_len} text positions, img_dim {config.img_dim}, "
                    f"pos_dim {config.pos_dim})"
                )
        if text_len > config.max_position_embeddings:
            raise ValueError(
                f"UniterModel input_ids has {text_len} positions, more than max_position_embeddings "
                f"{config.max_position_embeddings}"
            )
        if text_len + num_regions == 0:
            raise ValueError("UniterModel input is empty: no text positions and no regions")

    def save_pretrained(self, directory: Path | str) -> None:
        """Write config.json and the state dict (plain tensors, loadable with weights_only=True)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(directory / CONFIG_FILE)
        torch.save(self.state_dict(), directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: Path | str) -> UniterModel:
        """The model `save_pretrained` wrote, on the CPU (move it with `.to(device)`)."""
        directory = Path(directory)
        model = cls(UniterConfig.from_json_file(directory / CONFIG_FILE))
        weights = directory / WEIGHTS_FILE
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{weights}: model weights are missing") from None
        except Exception as err:  # unpickling errors come in many types; all mean an unreadable file
            first_line = str(err).strip().partition("\n")[0]
            raise ValueError(
                f"{weights}: cannot read the weights ({type(err).__name__}: {first_line})"
            ) from None
        if not isinstance(state, dict):
            raise ValueError(f"{weights}: holds a {type(state).__name__}, not a state dict")
        expected = model.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise ValueError(
                f"{weights}: weights do not match {directory / CONFIG_FILE} "
                f"(missing {missing}, unexpected {unexpected})"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{weights}: {name} has shape {tuple(tensor.shape)}, the config gives "
                    f"{tuple(expected[name].shape)}"
                )
        model.load_state_dict(state)
        return model
