"""One recogniser per construct the structure analysis finds (blocks, residual sites, attention,
MLPs and mixtures of experts, norms, embeddings, the head), each a mixin of `_Analyzer`
(`ir/analyze.py`), which holds the shared state and the driver."""
