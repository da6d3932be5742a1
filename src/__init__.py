"""tokenpaint: token-based text-to-image generation (VQGAN tokenizer, GPT and masked transformers, samplers)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import tokenpaint.vqgan` does not pull in the whole pipeline.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'tokenpaint' has no attribute {name!r}")
