"""What the server accepts and answers, as pydantic models: /openapi.json is generated from them.

Every request field has its type and range here (strict types: "12" is not an integer, true is not
a number); what depends on the request as a whole (the prompt plus max_tokens against the context,
n times the number of prompts) is checked by the server. Unknown fields are rejected, and OpenAI
fields this server does not implement are named in the error (UNSUPPORTED).

The request models are built per server (`request_models`) because token ids are bounded by the
vocabulary and lengths by the context. To add a request field, add it to `_Sampling` (or one of the
two request classes) with its range, then read it in `Server.prepare`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from leanlm.infer.engine_spec import MAX_K

SEED_MAX = (1 << 63) - 1
MAX_N = 16
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_MESSAGES = 1024

# OpenAI fields with no implementation here: a request that sends one gets a 400 naming it.
UNSUPPORTED = {
    "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
    "response_format", "best_of", "audio", "modalities", "prediction", "reasoning_effort",
    "web_search_options", "service_tier", "store", "metadata", "tool_calls", "refusal",
}
# fields accepted only at one value (the schema says which): what to tell a client that sends another
ONLY_DEFAULT = {
    "echo": "'echo' is not supported; leave it false",
    "suffix": "'suffix' is not supported",
    "presence_penalty": "'presence_penalty' is not supported; leave it at 0 (use 'repetition_penalty')",
    "frequency_penalty": "'frequency_penalty' is not supported; leave it at 0 (use 'repetition_penalty')",
}


def _only_false(v: bool) -> bool:
    if v is not False:  # a Literal[False] would take 0 too (0 == False)
        raise ValueError("only false is supported")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Speculative(_Strict):
    """Speculative decoding for this request (leanlm.infer.engine_spec); the same output, fewer target steps."""
    method: Literal["draft", "prompt_lookup", "layer_skip"] = Field(
        description="draft: the server's --draft model; prompt_lookup: n-grams of the prompt (no model); "
                    "layer_skip: the model with some layers skipped (server started with --layer-skip)")
    k: int = Field(4, ge=1, le=MAX_K, description="draft tokens of the first round")
    k_max: int | None = Field(None, ge=1, le=MAX_K, description="longest draft as the length adapts (default 2k)")
    adaptive: bool = Field(True, description="adapt the draft length to the acceptance (false: always k)")


def _sampling(vocab: int, max_len: int, model_name: str | None):
    class Sampling(_Strict):
        model: str = Field(min_length=1, max_length=256, description="a model id from GET /v1/models "
                                                                       "(the base model or a LoRA adapter)",
                           examples=[model_name] if model_name else None)
        max_tokens: int | None = Field(None, ge=1, le=max_len, description="default: 16 for completions, "
                                                                             "the rest of the context for chat")
        temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
        top_p: float = Field(1.0, ge=1e-6, le=1)
        top_k: int = Field(0, ge=-1, le=vocab, description="0 or -1: off")
        n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
        seed: int | None = Field(None, ge=0, le=SEED_MAX, description="choice j samples with seed + j")
        stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(min_length=1, max_length=MAX_STOP)] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
        frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
        repetition_penalty: float = Field(1.0, ge=0.01, le=10, description="vLLM's, 1: off")
        ignore_eos: bool = False
        user: str | None = Field(None, max_length=256, description="accepted and ignored")
        speculative: Speculative | None = Field(None, description='speculative decoding, e.g. {"method": '
                                                '"prompt_lookup", "k": 4}; usage then reports the draft tokens '
                                                'proposed and accepted')
        leanlm: dict | None = Field(None, description='leanlm extensions: {"compress_prompt": RATE} or '
                                    '{"compress_prompt": {"rate": RATE, "question": "..."}} compresses the '
                                    'prompt (LLMLingua-style, RATE in (0, 1] of its tokens kept) before prefill; '
                                    'usage then reports prompt_tokens_saved')
    return Sampling


def request_models(vocab: int, max_len: int, max_prompts: int = 64, model_name: str | None = None):
    """(CompletionRequest, ChatCompletionRequest) for a model with this vocabulary and context."""
    Sampling = _sampling(vocab, max_len, model_name)
    TokenId = Annotated[int, Field(ge=0, lt=vocab)]
    Ids = Annotated[list[TokenId], Field(min_length=1, max_length=max_len)]
    Text = Annotated[str, Field(min_length=1, max_length=1 << 20)]

    class CompletionRequest(Sampling):
        prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=max_prompts)] | Ids | Annotated[
            list[Ids], Field(min_length=1, max_length=max_prompts)] = Field(
            description="a string, a list of strings, token ids, or a list of token id lists")
        logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="top alternatives per token")
        echo: Annotated[bool, AfterValidator(_only_false)] = Field(
            False, description="not supported: only false", json_schema_extra={"enum": [False]})
        suffix: None = Field(None, description="not supported")

    class TextPart(_Strict):
        type: Literal["text"]
        text: str = Field(max_length=1 << 20)

    class Message(_Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Annotated[str, Field(max_length=1 << 20)] | Annotated[list[TextPart], Field(max_length=256)]
        name: str | None = Field(None, max_length=256)

    class ChatCompletionRequest(Sampling):
        messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
        max_completion_tokens: int | None = Field(None, ge=1, le=max_len, description="same as max_tokens")
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    return CompletionRequest, ChatCompletionRequest


# ---- responses ------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    """Token counts; a request with leanlm.compress_prompt also gets prompt_tokens_saved, one with speculative
    gets speculative: {method, proposed, accepted} (draft tokens; absent otherwise)."""
    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "abort"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = Field(None, description="for a LoRA adapter: the base model it applies to")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


class LoadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    lora_path: str = Field(min_length=1, max_length=4096, description="a folder under the server's --lora-dir")


class UnloadLoraRequest(_Strict):
    lora_name: str = Field(min_length=1, max_length=128)


class LoraStatus(BaseModel):
    status: str
    lora_name: str


def error_responses(*codes: int) -> dict:
    """OpenAPI `responses` entries: these status codes answer with the OpenAI error object."""
    what = {400: "invalid request", 401: "missing or wrong API key", 403: "not allowed", 404: "no such model",
            408: "request timed out", 413: "request body too large",
            429: "overloaded: retry after the Retry-After header's seconds", 500: "the engine failed",
            503: "shutting down"}
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}
