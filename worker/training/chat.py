"""Chat examples to tokens: where the chat template puts each assistant content, and what is trained.

Trained: the content tokens of every assistant message with weight 1, plus the end-of-turn token the
template puts right after it (`<|im_end|>` for ChatML and Qwen3, `<|end|>` or `<|return|>` for GPT-OSS,
`<｜end▁of▁sentence｜>` for DeepSeek-V3); never the role header, never text the template adds around a
content (Qwen3's empty `<think>\\n\\n</think>\\n\\n` before its last answer, GPT-OSS's
`<|channel|>final<|message|>`), never anything after the end-of-turn token.

The template's own text is learnt, not guessed: the conversation is rendered a second time with each
trained content replaced by a unique sentinel (a plain word: no whitespace, no tags, so the template
takes the same branches), which cuts that rendering into the template's text around the contents. The
real rendering must then be exactly that text interleaved with the contents (each as given, or without
the surrounding whitespace the template strips); the content spans are read off it. Weight-0 contents
are context only and stay as they are in both renderings, so the template may print them as it likes
(Qwen3 drops the reasoning of earlier turns). And what the model sees before a trained turn must be
what it sees when it generates that turn: the rendering of the messages before it with the generation
prompt is a prefix of the conversation's rendering.

The rendering is cut at the trained contents and each piece is tokenised on its own, so a mask
boundary can never fall inside a token, and the trained tokens are exactly the ones the model will
have to produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.training.formats import ChatExample


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to locate assistant turns."""


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]) if text else []


def render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool, line: int) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # the template's raise_exception(), or a Jinja error on this conversation
        raise TemplateError(f"line {line}: the chat template failed on this conversation: {err}") from err
    if not isinstance(text, str):
        raise TemplateError("the chat template did not render to text")
    return text


def _sentinels(n: int, avoid: str) -> list[str]:
    """n distinct plain words, none of which occurs in `avoid` (the real rendering)."""
    salt = 0
    while True:
        words = [f"TunePoolContent{salt}x{k}y" for k in range(n)]  # the `y` ends it: no word prefixes another
        if not any(word in avoid for word in words):
            return words
        salt += 1


def _variants(content: str) -> list[str]:
    """The content as a template may print it, as given first: as is, or without its leading/trailing
    whitespace (all of it, as Jinja's trim and str.strip do, or only newlines, as Qwen3's lstrip('\\n'))."""
    heads = sorted({0, len(content) - len(content.lstrip("\n")), len(content) - len(content.lstrip())})
    tails = sorted({len(content), len(content.rstrip("\n")), len(content.rstrip())}, reverse=True)
    return list(dict.fromkeys(content[a:b] for a in heads for b in tails if a < b))


def _template_text(
    tokenizer: Any, messages: list[dict[str, str]], trained: list[int], full: str, line: int
) -> list[str]:
    """The template's text around the trained contents: len(trained) + 1 pieces."""
    words = _sentinels(len(trained), full)
    masked = [dict(m) for m in messages]
    for word, i in zip(words, trained, strict=True):
        masked[i]["content"] = word
    skeleton = render(tokenizer, masked, False, line)
    pieces: list[str] = []
    cursor = 0
    for word, i in zip(words, trained, strict=True):
        at = skeleton.find(word, cursor)
        if at == -1 or skeleton.count(word) != 1:
            raise TemplateError(
                f"line {line}: the chat template does not print assistant message messages[{i}] exactly "
                "once; its content cannot be located for training"
            )
        pieces.append(skeleton[cursor:at])
        cursor = at + len(word)
    pieces.append(skeleton[cursor:])
    return pieces


def _altered(line: int, turns: list[int]) -> TemplateError:
    which = " or ".join(f"messages[{i}]" for i in turns)
    return TemplateError(
        f"line {line}: the chat template altered assistant message {which} (or the text around it depends "
        "on its content, as a template that moves <think> blocks does); it must print the content as "
        "given, at most without surrounding whitespace"
    )


def _content_spans(
    full: str, pieces: list[str], contents: list[str], where: list[int], line: int
) -> list[tuple[int, int]]:
    """(start, end) of each content in `full`, which must be pieces[0] + c0 + pieces[1] + ... + pieces[n],
    each c a variant of its content. The start of a content is unique (contents are never blank); of
    its variants, the one the next piece follows is taken (and the last piece ends the rendering).
    A mismatch names the content it is in, or the two contents around the template text it is in."""
    if not full.startswith(pieces[0]):
        raise _altered(line, where[:1])
    spans: list[tuple[int, int]] = []
    start = len(pieces[0])
    for k, content in enumerate(contents):
        following = pieces[k + 1]
        printed = [v for v in _variants(content) if full.startswith(v, start)]
        if not printed:
            raise _altered(line, [where[k]])
        fits = [
            v
            for v in printed
            if full.startswith(following, start + len(v))
            and (k + 1 < len(contents) or start + len(v) + len(following) == len(full))
        ]
        if not fits:
            raise _altered(line, where[k : k + 2])
        spans.append((start, start + len(fits[0])))
        start += len(fits[0]) + len(following)
    return spans


def chat_tokens(tokenizer: Any, example: ChatExample) -> tuple[list[int], list[bool]]:
    """(input_ids, trained) of a chat example rendered with the tokenizer's chat template."""
    line = example.line
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the model's tokenizer has no chat template; use prompt/completion data")
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    trained_turns = [i for i, m in enumerate(example.messages) if m.role == "assistant" and m.weight == 1]
    full = render(tokenizer, messages, False, line)
    pieces = _template_text(tokenizer, messages, trained_turns, full, line)
    contents = [messages[i]["content"] for i in trained_turns]
    spans = _content_spans(full, pieces, contents, trained_turns, line)
    for i, (start, _) in zip(trained_turns, spans, strict=True):
        prompt = render(tokenizer, messages[:i], True, line)
        if not full.startswith(prompt) or len(prompt) > start:
            raise TemplateError(
                f"line {line}: the chat template renders the conversation before messages[{i}] differently "
                "from the prompt that generates that message (the messages before it, with the generation "
                "prompt); training on it would not match generation"
            )
    ids: list[int] = []
    trained: list[bool] = []
    cursor = 0
    for n, (start, end) in enumerate([*spans, (len(full), len(full))]):
        between = encode(tokenizer, full[cursor:start])
        if n > 0:
            # The token right after a trained content is its end-of-turn token: trained too.
            if not between:
                between = [tokenizer.eos_token_id]
            trained.extend([True] + [False] * (len(between) - 1))
        else:
            trained.extend([False] * len(between))
        ids.extend(between)
        content_ids = encode(tokenizer, full[start:end])
        ids.extend(content_ids)
        trained.extend([True] * len(content_ids))
        cursor = end
    return ids, trained
