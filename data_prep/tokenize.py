"""Chat-templated tokenisation: prompt = template with the generation prompt; response follows.

The response ends with the tokenizer's EOS (the end-of-turn token for chat models), so the
trained model learns to stop; a response cut at a generation limit does not. A response that
carries its exact tokens (a shipped self-distilled corpus) keeps them when the vocabulary is the
one they were made with: re-tokenising the decoded text can merge tokens differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .sources import Conversation

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int
    truncated: bool = False


class ChatTokenizer:
    def __init__(self, tokenizer, chat_template: str = "", name: str = "tokenizer"):
        if chat_template == "plain":
            template = PLAIN_TEMPLATE
        elif chat_template:
            template = chat_template
        else:
            template = getattr(tokenizer, "chat_template", None)
            if not template:
                raise ValueError(
                    f"{name} has no chat template: set chat_template=plain (a simple 'role: content' "
                    "template) or give a Jinja chat template in the config"
                )
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{name} has no EOS token; responses could never end")
        self.tokenizer = tokenizer
        self.template = template
        self.eos = tokenizer.eos_token_id
        self._vocab_sha256 = ""

    @property
    def vocab_sha256(self) -> str:
        if not self._vocab_sha256:
            from .fingerprint import vocab_fingerprint

            self._vocab_sha256 = vocab_fingerprint(self.tokenizer)["vocab_sha256"]
        return self._vocab_sha256

    def _apply(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])

    def prompt(self, conv: Conversation) -> list[int]:
        """The templated prompt with the generation prompt: what the model answers."""
        return self._apply(conv.messages, True)

    def encode(self, conv: Conversation) -> tuple[list[int], int]:
        """(token ids, prompt length): the templated prompt, then the response up to its EOS."""
        prompt = self.prompt(conv)
        if conv.response_ids is not None and conv.ids_vocab == self.vocab_sha256:
            return prompt + list(conv.response_ids), len(prompt)
        eos = [self.eos] if conv.complete else []
        full = self._apply(conv.messages + [{"role": "assistant", "content": conv.response}], False)
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            response = full[len(prompt) :]
            if self.eos in response:
                response = response[: response.index(self.eos)] + eos
            else:
                response = response + eos
        else:  # a template that rewrites earlier turns: tokenise the response on its own
            response = self.tokenizer(conv.response, add_special_tokens=False)["input_ids"] + eos
        return prompt + response, len(prompt)


def fit_length(ids: list[int], prompt_len: int, max_len: int, overlong: str) -> Encoded | str:
    """Apply max_len: an Encoded sample, or the reason it is skipped."""
    if prompt_len >= max_len:
        return "prompt_too_long"
    if len(ids) <= max_len:
        return Encoded(ids, prompt_len)
    if overlong == "skip":
        return "too_long"
    return Encoded(ids[:max_len], prompt_len, truncated=True)


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any special token (e.g. `<|im_end|>`): such text inside a
    message is read by the tokenizer as the token itself, so it would end a turn or open a fake
    one. Longest first, so that a token is never matched by a shorter prefix of it."""
    texts = set(tokenizer.all_special_tokens)
    texts |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    texts = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None
