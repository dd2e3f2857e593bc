"""Configuration of a liquid-pretrain export (`model_type` "liquid_moe").

Written by `liquid export` beside the weights; load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Self-contained: needs only torch and
transformers (4.57 or 5.x).

`liquid_model` holds the project's model configuration (the `model` section of the run's config) plus the
resolved per-layer kinds (`layer_kinds`, `ffn_kinds`); `liquid_pretrain` records where the weights came
from (run, checkpoint, step, train.seq_len).
"""
from transformers import PretrainedConfig


class LiquidMoeConfig(PretrainedConfig):
    model_type = "liquid_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, liquid_model=None, liquid_pretrain=None, tie_word_embeddings=False, **kwargs):
        self.liquid_model = dict(liquid_model or {})
        self.liquid_pretrain = dict(liquid_pretrain or {})
        # The usual names, for tools that read them.
        for name, key in (("vocab_size", "vocab_size"), ("hidden_size", "d_model"),
                          ("num_hidden_layers", "num_layers")):
            kwargs.pop(name, None)
            setattr(self, name, self.liquid_model.get(key))
        # The output head reads the embedding matrix directly; there is no lm_head to tie.
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
