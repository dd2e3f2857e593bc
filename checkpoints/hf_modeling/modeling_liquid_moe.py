"""Hugging Face wrapper around the liquid-pretrain model (`model_type` "liquid_moe").

`liquid_model.py` and the modules it imports are the project's own model code (pretrain/model/), copied
by `liquid export` with their imports made relative, so this directory computes exactly what training
computed. Needs only torch and transformers.

Limitations: no key/value or recurrent cache in `generate` (every step recomputes the whole prefix; the
project's `LiquidLM.step` has O(1) state but is not wired to transformers' cache classes), and no padding
(an `attention_mask` with zeros is refused). `doc_start` ([batch, seq] bool) marks document starts inside
a packed row, as in training.
"""
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_liquid_moe import LiquidMoeConfig
# transformers copies a local directory's remote code by following this file's own relative imports only
# (not theirs), so every generated module is imported here.
from .liquid_layers import RMSNorm  # noqa: F401
from .liquid_scan import liquid_scan  # noqa: F401
from .liquid_mixers import build_mixer  # noqa: F401
from .liquid_ffn import build_ffn  # noqa: F401
from .liquid_loss import linear_cross_entropy_sum  # noqa: F401
from .liquid_model import LiquidLM


class _Section:
    """Attribute access over a dict, standing in for the project's frozen config dataclasses."""

    def __init__(self, values: dict):
        for key, value in values.items():
            setattr(self, key, _Section(value) if isinstance(value, dict) else value)


class _ModelConfig(_Section):
    def __init__(self, values: dict):
        values = dict(values)
        self._layer_kinds = list(values.pop("layer_kinds"))
        self._ffn_kinds = list(values.pop("ffn_kinds"))
        super().__init__(values)

    def layer_types(self):
        return list(self._layer_kinds)

    def ffn_types(self):
        return list(self._ffn_kinds)


class LiquidMoePreTrainedModel(PreTrainedModel):
    config_class = LiquidMoeConfig
    config: LiquidMoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        pass  # every module initialises itself (LiquidLM.reset_parameters); exports load all weights


class LiquidMoeForCausalLM(LiquidMoePreTrainedModel, GenerationMixin):
    def __init__(self, config: LiquidMoeConfig):
        super().__init__(config)
        self.model = LiquidLM(_ModelConfig(config.liquid_model))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return None  # the head is the (tied) embedding matrix, read inside LiquidLM.head

    def forward(self, input_ids=None, attention_mask=None, labels=None, doc_start=None, return_dict=None,
                **kwargs):
        if input_ids is None:
            raise ValueError("liquid_moe: input_ids is required (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("liquid_moe: padding (zeros in attention_mask) is not supported; "
                             "run rows of equal length or one row at a time")
        logits = self.model(input_ids, doc_start=doc_start).logits
        loss = None
        if labels is not None:  # the usual causal-LM convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _reorder_cache(self, past_key_values, beam_idx):
        return past_key_values
