"""Plain greedy decoding against speculative decoding on one prompt (`leanlm bench --draft/--prompt-lookup`)."""
from __future__ import annotations

import time


def bench_speculative(model, tok, draft, prompt_len: int, new_tokens: int, prompt_lookup: bool = False) -> dict:
    """The prompt is the end of the packaged evaluation text (real text, so prompt lookup has n-grams to
    draw from); speculative decoding must reproduce the plain output exactly (identical_output)."""
    from leanlm.data import packaged_text
    from leanlm.infer import speculative
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    ids = tok.encode(packaged_text("eval")[:4000])[-prompt_len:]
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    plain = [s[0] for s in generate_tokens(model, [ids], cfg)]
    t_plain = time.perf_counter() - t
    t = time.perf_counter()
    spec, stats = speculative.generate_speculative(model, ids, cfg, draft=draft, prompt_lookup=prompt_lookup)
    t_spec = time.perf_counter() - t
    return {"plain_tokens_per_s": len(plain) / t_plain, "speculative_tokens_per_s": len(spec) / t_spec,
            "speedup": t_plain / t_spec * len(spec) / max(len(plain), 1),
            "acceptance_rate": stats.acceptance_rate, "tokens_per_round": stats.tokens_per_round,
            "identical_output": spec[: len(plain)] == plain}
