"""schemathesis against the server's own /openapi.json: no 5xx, no hang, answers that match the schema.

A bounded number of examples per operation here (CI); benchmarks/serve_fuzz.py runs many more.
"""
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)

from leanlm.infer.engine import Engine
from test_serve import NAME, tiny_model, tiny_tokenizer

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


def make_app(request_timeout=20.0):
    from leanlm.serve.app import build_app
    from leanlm.serve.engine_loop import AsyncEngine

    eng = Engine(tiny_model(), block_size=4, num_blocks=256, max_batch_tokens=64, max_num_seqs=8, eos_ids=(1,))
    aeng = AsyncEngine(eng)
    # at most 8 choices per request: generated 64-prompt requests get a quick 400, not minutes of decoding
    return build_app(aeng, tiny_tokenizer(), NAME, request_timeout=request_timeout, max_choices=8), aeng


APP, AENG = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def shape(case):
    """Point most generated requests at the served model and keep generations short (CI time)."""
    body = dict(case.body) if isinstance(case.body, dict) else None
    if body is not None and "/completions" in case.path:
        if isinstance(body.get("model"), str) and len(body["model"]) % 4:  # a quarter keep theirs (404s)
            body["model"] = NAME
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body["max_tokens"] = 8
        if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 8:
            body["max_completion_tokens"] = 8
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 8
        case.body = body  # assigned, so schemathesis re-validates it (a negative case may have become valid)


@schema.parametrize()
@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_schemathesis(case):
    shape(case)
    r = case.call_and_validate(checks=CHECKS, timeout=120)
    assert r.status_code != 408, "a request hung until the server's timeout"


@pytest.fixture(scope="module", autouse=True)
def _engine_teardown():
    yield
    AENG.engine.cache.alloc.check_whole()  # no request left blocks behind
    AENG.shutdown()
