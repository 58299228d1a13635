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


def compress_prompt(context, question=None, rate=0.5, model=None, tokenizer=None, **kw):
    """Compress a prompt's context to `rate` of its tokens: see leanlm.data.prompt_compress."""
    from leanlm.data.prompt_compress import compress_prompt as _compress

    return _compress(context, question, rate, model, tokenizer, **kw)


__all__ = ["load", "save", "generate", "stream", "perplexity", "compress_prompt", "LeanLMError"]
