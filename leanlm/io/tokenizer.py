"""Tokenizer (the `tokenizers` library) and the model's own Jinja chat template.

Built from a Hugging Face folder (tokenizer.json + tokenizer_config.json) or from GGUF metadata.
Saved back as a folder that transformers' AutoTokenizer reads with the same ids.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.io.atomic import atomic_write_text

# Pre-tokenizer split patterns named by GGUF's tokenizer.ggml.pre (as llama.cpp defines them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _render_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two known pieces,
    ranked by the piece's score (the order transformers and llama.cpp use)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_bpe(f: dict, tokens: list[str], vocab: dict[str, int]):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = HFTok(models.BPE(vocab=vocab, merges=spm_merges(vocab, dict(zip(tokens, scores))), unk_token=unk,
                           fuse_unk=True, byte_fallback=True))
    prefix = f.get("tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    seq = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        seq.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(seq)
    return tok


class Tokenizer:
    def __init__(self, tok, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, eos_tokens: list[str] | None = None):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self._template = None
        ids = [tok.token_to_id(t) for t in ([eos_token] if eos_token else []) + (eos_tokens or [])]
        self.eos_ids = sorted({i for i in ids if i is not None})
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.pad_id = tok.token_to_id(pad_token) if pad_token else None
        probe = tok.encode("", add_special_tokens=True).ids
        self.add_bos = bool(probe) and probe[0] == self.bos_id

    # ---- text <-> ids ----
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def encode_batch(self, texts: list[str], add_special: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special)]

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    # ---- chat ----
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise LeanLMError("this model has no chat template; use `generate --prompt` with plain text instead")
        if self._template is None:
            self._template = _render_env().from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special=False)

    # ---- files ----
    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTok

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise LeanLMError(f"{folder}: no tokenizer.json (leanlm reads fast tokenizers only); "
                              "save the tokenizer with transformers' save_pretrained first")
        try:
            tok = HFTok.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise LeanLMError(f"{path}: cannot read tokenizer ({str(e).splitlines()[0]})")
        conf = {}
        if (folder / "tokenizer_config.json").exists():
            try:
                conf = json.loads((folder / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise LeanLMError(f"{folder / 'tokenizer_config.json'}: malformed JSON at line {e.lineno}")
        template = conf.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        gen_eos = []
        gpath = folder / "generation_config.json"
        if gpath.exists():
            try:
                g = json.loads(gpath.read_text()).get("eos_token_id")
                ids = g if isinstance(g, list) else ([g] if g is not None else [])
                gen_eos = [tok.id_to_token(i) for i in ids if tok.id_to_token(i)]
            except json.JSONDecodeError:
                pass
        return cls(tok, tok_str(conf.get("bos_token")), tok_str(conf.get("eos_token")),
                   tok_str(conf.get("pad_token")), tok_str(conf.get("unk_token")), template, gen_eos)

    @classmethod
    def from_gguf_fields(cls, f: dict, source: str) -> "Tokenizer":
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTok

        kind = f.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise LeanLMError(f"{source}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' "
                              "and SentencePiece BPE 'llama' are); load the model's Hugging Face folder instead")
        tokens = f.get("tokenizer.ggml.tokens")
        if not tokens:
            raise LeanLMError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens; the file is incomplete")
        types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "llama":
            tok = _sentencepiece_bpe(f, tokens, vocab)
        else:
            merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
            tok = HFTok(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = f.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if kind == "llama":
            pass  # Metaspace pre-tokenizer and decoder set by _sentencepiece_bpe
        elif pre == "smollm":
            # SmolLM's tokenizer.json splits every digit (llama.cpp's "smollm" pre-type does the same).
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _PRE_SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = byte_level
        if kind == "gpt2":
            tok.decoder = decoders.ByteLevel()
        # CONTROL (3) tokens are special; USER_DEFINED (4) are matched whole but not special.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty == 3])
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])

        def name(key):
            i = f.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = name("bos_token_id"), name("eos_token_id")
        add_bos = f.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for SentencePiece
        if add_bos and bos:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        extra_eos = [name("eot_token_id")] if name("eot_token_id") else []
        return cls(tok, bos, eos, name("padding_token_id"), name("unknown_token_id"),
                   f.get("tokenizer.chat_template"), extra_eos)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        atomic_write_text(folder / "tokenizer.json", self.tok.to_str())
        conf = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "pad_token": self.pad_token, "unk_token": self.unk_token,
            "add_bos_token": self.add_bos, "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(conf, indent=2, ensure_ascii=False))
        special = {k: v for k, v in [("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token), ("unk_token", self.unk_token)] if v}
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2, ensure_ascii=False))
