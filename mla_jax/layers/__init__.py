"""Building blocks: norms, rotary embeddings, MLPs, MLA and baseline attention."""
