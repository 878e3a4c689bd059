"""Engines the passes share: the residual-scheme engine (`residual`), the growth engine
(`growth`, `heads`), attention as memory ops (`attention_memory`) and the decode form
(`decode`)."""
