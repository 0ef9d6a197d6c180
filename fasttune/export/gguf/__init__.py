"""GGUF export: tensor-name maps (tensor_maps), tokenizer metadata (tokenizer), quantizers (quants, kquants, mixes),
the file writer (writer), reading files back (reader) and ``save_pretrained_gguf`` (save).

Kept free of imports so that ``fasttune.export.gguf.kquants`` can be used on its own.
"""
