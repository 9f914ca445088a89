"""tunesmith: curate an instruction dataset, fine-tune, evaluate and quantize an LLM."""

__version__ = "0.1.0"
