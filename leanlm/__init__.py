"""leanlm: efficient LLMs on the hardware you have — load, compress, fine-tune, serve, measure."""
from leanlm.api import load, save
from leanlm.errors import LeanLMError

__version__ = "0.1.0"


def generate(model, tokenizer, prompts, cfg=None, chat=False, **kw):
    """Generate text: see leanlm.infer.generate.generate."""
    from leanlm.infer.generate import generate as _generate

    return _generate(model, tokenizer, prompts, cfg, chat=chat, **kw)


def stream(model, tokenizer, prompt, cfg=None, chat=False, **kw):
    """Stream text pieces: see leanlm.infer.generate.stream."""
    from leanlm.infer.generate import stream as _stream

    return _stream(model, tokenizer, prompt, cfg, chat=chat, **kw)


def perplexity(model, tokenizer, text, **kw):
    """Sliding-window perplexity: see leanlm.eval.perplexity.perplexity."""
    from leanlm.eval.perplexity import perplexity as _perplexity

    return _perplexity(model, tokenizer, text, **kw)


__all__ = ["load", "save", "generate", "stream", "perplexity", "LeanLMError"]
