"""Models in and out: model specs (`models`), the built-in zoo (`zoo`), saved artifacts
(`artifact`), Hugging Face export (`hf_export`), optimizer growth (`optimizer`), generation
(`generate`, `genai`) and memory inspection (`memory_inspect`)."""
