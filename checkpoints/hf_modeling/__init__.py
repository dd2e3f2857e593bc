"""Templates of the Hugging Face wrapper shipped beside `liquid_moe` exports (see checkpoints/export.py).

These files are copied into an export directory next to the model code generated from pretrain/model/;
they are not imported from here (they import transformers and the generated `liquid_model` module).
"""
