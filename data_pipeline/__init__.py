"""From raw documents to the rows the model trains on: corpora, tokenization, packing, loading."""
