"""Chat templates of reasoning models: exactly each weight-1 assistant content and its end-of-turn
token are trained, whatever the template adds around the content.

The templates below are our own "-style" rewrites of the logic of the real ones (Qwen3's hybrid
thinking, DeepSeek-V3's, GPT-OSS's harmony format), without their tool-calling branches. Each test
tokenizer is the tiny byte-level BPE one with the template's tags added as tokens, as the real
tokenizers have them; the template is given as a job's `chat_template` is: by assignment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.worker.training.conftest import build_tokenizer, chat_rows, write_jsonl
from tests.worker.training.test_data import CONVERSATION, trained_runs
from worker.training.data import TemplateError, load_dataset, tokenize_chat
from worker.training.formats import ChatExample, Message

# Qwen3: the last assistant turn after the last user query gets a (here empty) <think> block; turns
# before it are printed bare, their reasoning dropped; the generation prompt closes an empty think
# block only when thinking is switched off.
QWEN3_STYLE = r"""
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user'
            and not (message.content.startswith('<tool_response>')
                     and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                                                .split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n'
                + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# DeepSeek-V3: BOS and all system prompts first, then <｜User｜>/<｜Assistant｜> turns, each answer
# closed by the end-of-sentence token; no newline anywhere.
DEEPSEEK_V3_STYLE = r"""
{%- set ns = namespace(system_prompt='', is_first_sp=true) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.is_first_sp %}
            {%- set ns.system_prompt = ns.system_prompt + message['content'] %}
            {%- set ns.is_first_sp = false %}
        {%- else %}
            {%- set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{{- bos_token + ns.system_prompt }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<｜Assistant｜>' }}
{%- endif %}
"""

# GPT-OSS (harmony): a fixed system header, the system message as developer instructions, every
# answer on the final channel; the last answer of a training conversation ends with <|return|>,
# earlier ones with <|end|>; the generation prompt stops at <|start|>assistant.
GPT_OSS_STYLE = r"""
{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n'
    + 'Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n'
    + '# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>' }}
{%- if messages[0].role == 'system' %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message %}
    {{- '<|start|>developer<|message|># Instructions\n\n' + developer_message + '<|end|>' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == 'assistant' %}
        {%- if '<|channel|>analysis<|message|>' in message.content
                or '<|channel|>final<|message|>' in message.content %}
            {{- raise_exception('You have passed a message containing <|channel|> tags in the content '
                                + 'field.') }}
        {%- endif %}
        {%- if loop.last and not add_generation_prompt %}
            {%- if 'thinking' in message %}
                {{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}
            {%- endif %}
            {{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}
        {%- else %}
            {{- '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|start|>user<|message|>' + message.content + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start|>assistant' }}
{%- endif %}
"""

# Llama-3: every content printed through Jinja's trim.
LLAMA3_STYLE = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# name: (template, special tokens, other added tokens, BOS, end-of-turn of the middle and last answer,
#        text the template puts between the generation prompt and the middle and the last answer)
TEMPLATES: dict[str, tuple[str, list[str], list[str], str | None, tuple[str, str], tuple[str, str]]] = {
    "qwen3": (
        QWEN3_STYLE,
        [],
        ["<think>", "</think>"],
        None,
        ("<|im_end|>",) * 2,
        ("", "<think>\n\n</think>\n\n"),
    ),
    "deepseek-v3": (
        DEEPSEEK_V3_STYLE,
        ["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"],
        [],
        "<｜begin▁of▁sentence｜>",
        ("<｜end▁of▁sentence｜>",) * 2,
        ("", ""),
    ),
    "gpt-oss": (
        GPT_OSS_STYLE,
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"],
        [],
        None,
        ("<|end|>", "<|return|>"),
        ("<|channel|>final<|message|>",) * 2,
    ),
}


def tokenizer_with(
    template: str, special: list[str], added: Sequence[str] = (), bos: str | None = None
) -> Any:
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": special, **({"bos_token": bos} if bos else {})}
    )
    tokenizer.add_tokens(list(added))
    tokenizer.chat_template = template  # as the model loader applies a job's chat_template
    return tokenizer


def render(tokenizer: Any, example: ChatExample, upto: int | None = None) -> str:
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    if upto is None:
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return str(tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=True))


def contexts(tokenizer: Any, ids: list[int], trained: list[bool]) -> list[str]:
    """The decoded tokens before each run of trained tokens: what the model sees before it answers."""
    starts = [i for i, on in enumerate(trained) if on and (i == 0 or not trained[i - 1])]
    return [tokenizer.decode(ids[:i], skip_special_tokens=False) for i in starts]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_reasoning_templates_train_exactly_contents_plus_end_of_turn(name: str) -> None:
    template, special, added, bos, (middle_end, last_end), (middle_header, last_header) = TEMPLATES[name]
    tokenizer = tokenizer_with(template, special, added, bos)
    tok = tokenize_chat(tokenizer, CONVERSATION)
    middle, last = CONVERSATION.messages[4], CONVERSATION.messages[6]
    # exactly the two weight-1 contents and their end-of-turn tokens; not the weight-0 answer
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == [
        middle.content + middle_end,
        last.content + last_end,
    ]
    assert tokenizer.decode(tok.input_ids, skip_special_tokens=False) == render(tokenizer, CONVERSATION)
    # before each answer: the generation prompt, then the text the template inserts (untrained)
    assert contexts(tokenizer, tok.input_ids, tok.trained) == [
        render(tokenizer, CONVERSATION, 4) + middle_header,
        render(tokenizer, CONVERSATION, 6) + last_header,
    ]
    if bos:
        assert tok.input_ids[0] == tokenizer.bos_token_id and tok.input_ids.count(tokenizer.bos_token_id) == 1
    for token in (middle_end, last_end):  # the end-of-turn tokens are single tokens
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def test_qwen3_history_reasoning_is_dropped_and_never_trained() -> None:
    """A weight-0 turn may hold reasoning that the template drops from the history: it is context."""
    tokenizer = tokenizer_with(QWEN3_STYLE, [], ["<think>", "</think>"])
    messages = list(CONVERSATION.messages)
    messages[2] = Message("assistant", "<think>\n2 and 2 make 4\n</think>\n\nIt is 4.", 0)
    tok = tokenize_chat(tokenizer, ChatExample(tuple(messages), line=9))
    text = tokenizer.decode(tok.input_ids, skip_special_tokens=False)
    assert "2 and 2 make 4" not in text and "<|im_start|>assistant\nIt is 4.<|im_end|>" in text
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == [
        "6, since 3 + 3 = 6.<|im_end|>",
        " Spaces  and\ttabs stay <|im_end|>",
    ]


def test_qwen3_template_moving_a_trained_think_block_is_refused_with_the_line() -> None:
    tokenizer = tokenizer_with(QWEN3_STYLE, [], ["<think>", "</think>"])
    messages = list(CONVERSATION.messages)
    messages[6] = Message("assistant", "<think>\nsmall sums\n</think>\n\nYou are welcome.", 1)
    with pytest.raises(
        TemplateError, match=r"line 12: .*altered assistant message messages\[4\] or messages\[6\]"
    ):
        tokenize_chat(tokenizer, ChatExample(tuple(messages), line=12))


def test_a_trimming_template_trains_the_trimmed_content() -> None:
    tokenizer = tokenizer_with(LLAMA3_STYLE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    example = ChatExample((Message("user", "Hi", 0), Message("assistant", "\n  padded answer \n", 1)), line=2)
    tok = tokenize_chat(tokenizer, example)
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == ["padded answer<|eot_id|>"]


def test_a_template_that_alters_a_trained_content_is_refused_with_the_line() -> None:
    altering = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | replace('4', 'four')"
        " + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = tokenizer_with(altering, [])
    example = ChatExample((Message("user", "2 + 2?", 0), Message("assistant", "It is 4.", 1)), line=7)
    with pytest.raises(TemplateError, match=r"line 7: .*altered assistant message messages\[1\]"):
        tokenize_chat(tokenizer, example)
    # a weight-0 answer is context only: the template may print it as it likes
    context_only = ChatExample(
        (
            *example.messages[:1],
            Message("assistant", "It is 4.", 0),
            Message("user", "3?", 0),
            Message("assistant", "Three.", 1),
        ),
        line=8,
    )
    tok = tokenize_chat(tokenizer, context_only)
    assert trained_runs(tokenizer, tok.input_ids, tok.trained) == ["Three.<|im_end|>"]


def test_a_generation_prompt_the_training_text_lacks_is_refused_with_the_line() -> None:
    """DeepSeek-R1-style: the generation prompt opens <think>, the rendered conversation does not."""
    r1 = DEEPSEEK_V3_STYLE.replace("{{- '<｜Assistant｜>' }}", "{{- '<｜Assistant｜><think>\\n' }}")
    _, special, _, bos, _, _ = TEMPLATES["deepseek-v3"]
    tokenizer = tokenizer_with(r1, special, ["<think>"], bos)
    with pytest.raises(TemplateError, match=r"line 1: .*before messages\[4\] differently"):
        tokenize_chat(tokenizer, CONVERSATION)


def test_a_template_exception_is_a_template_error_with_the_line() -> None:
    tokenizer = tokenizer_with(GPT_OSS_STYLE, TEMPLATES["gpt-oss"][1])
    example = ChatExample(
        (Message("user", "Hi", 0), Message("assistant", "<|channel|>final<|message|>Hello", 1)), line=5
    )
    with pytest.raises(TemplateError, match=r"line 5: .*<\|channel\|> tags"):
        tokenize_chat(tokenizer, example)


def test_qwen3_template_given_as_a_string_trains_a_whole_file(tmp_path: Path) -> None:
    """The loader path: a job's chat_template assigned to the tokenizer, then the whole file loaded."""
    tokenizer = tokenizer_with(QWEN3_STYLE, [], ["<think>", "</think>"])
    rows = chat_rows(24)
    data = load_dataset(
        write_jsonl(tmp_path / "t.jsonl", rows),
        tokenizer,
        max_seq_length=10_000,
        overlength="drop",
        max_line_bytes=1 << 20,
    )
    assert len(data.examples) == len(rows)
    for row, tok in zip(rows, data.examples, strict=True):
        answers = [m for m in row["messages"] if m["role"] == "assistant" and m.get("weight", 1) == 1]
        assert trained_runs(tokenizer, tok.input_ids, tok.trained) == [
            m["content"] + "<|im_end|>" for m in answers
        ]
        # the last answer follows an (untrained) empty think block, as at generation with thinking
        assert "<|im_start|>assistant\n<think>\n\n</think>\n\n" + answers[-1]["content"] in tokenizer.decode(
            tok.input_ids, skip_special_tokens=False
        )
