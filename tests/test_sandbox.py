"""mechfix renders chat templates itself, in a sandbox with limits: exactly as transformers does, and never unbounded."""

from __future__ import annotations

import time

import pytest
from tiny import byte_tokenizer

from mechfix.errors import BadInputError
from mechfix.scenario.sandbox import LIMITS, Limits, TemplateLimitError, render
from mechfix.scenario.templates import BUILTIN_TEMPLATES, render_chat

# Templates written the way real model families write theirs: tools and namespaces (Qwen-like), a date and a
# system default (Llama-3.1-like), {% generation %} marks and loop controls (SmolLM-like).
QWEN_LIKE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- "\\n\\n# Tools\\n<tools>" }}{%- for tool in tools %}{{- "\\n" }}
{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- else %}{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{%- set content = message.content %}{%- if '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content }}{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}{{- '"}\\n</tool_call>' }}{%- endfor %}{%- endif %}
{{- '<|im_end|>\\n' }}{%- elif message.role == "tool" %}{{- '<|im_start|>user\\n<tool_response>\\n' }}{{- message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

LLAMA31_LIKE = """{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

SMOL_LIKE = """{%- for message in messages %}{%- if loop.index0 > 40 %}{%- break %}{%- endif %}
{%- if message.role == 'system' and not loop.first %}{%- continue %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.role == 'assistant' %}{% generation %}{{- message.content }}{% endgeneration %}
{%- else %}{{- message.content }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}{{- ('x' * 3) ~ (2 ** 10) ~ ('%05d' % 7) ~ '{:>4}'.format('r') }}
{{- ' '.join(['a', 'b']) ~ ('ab'|replace('a', 'c')) ~ ('hi'|center(6)) ~ ('l1\\nl2'|indent(2)) ~ (messages|length) }}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

REAL_LIKE = {**BUILTIN_TEMPLATES, "qwen-like": QWEN_LIKE, "llama31-like": LLAMA31_LIKE, "smol-like": SMOL_LIKE}

CONVERSATIONS = [
    [{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "Ana: hello"},
     {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Ben: and now? {{ not a tag }} {% raw %}"}],
    [{"role": "user", "content": "Host: Capital of France?\n\nAna: Lyon.\n\nBen: Lyon."}],
    [{"role": "system", "content": "Team chat."}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "<think>hm</think>\nA", "tool_calls": None}, {"role": "user", "content": "  trimmed  "}],
]


def _tokenizer(source: str):
    tok = byte_tokenizer()
    tok.chat_template = source
    return tok


@pytest.mark.parametrize("name", list(REAL_LIKE))
def test_rendering_in_the_sandbox_gives_exactly_what_apply_chat_template_gives(name):
    tok = _tokenizer(REAL_LIKE[name])
    for messages in CONVERSATIONS:
        if name in ("gemma", "mistral") and messages[-1]["role"] != "user":
            continue
        try:
            truth = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - the template refuses this conversation: so must mechfix
            with pytest.raises(BadInputError):
                render_chat(tok, messages, "does not render", "fix it")
            continue
        assert render_chat(tok, messages, "does not render", "fix it") == truth


def test_a_long_real_conversation_renders_far_within_the_limits():
    # 2,000 messages of 2,000 characters: about a million tokens, more than nearly any model's context.
    messages = [{"role": "system", "content": "Team chat."}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": f"Agent{i}: " + "word " * 400} for i in range(2000)]
    for name in ("qwen-like", "llama31-like", "chatml"):
        tok = _tokenizer(REAL_LIKE[name])
        start = time.monotonic()
        text = render_chat(tok, messages, "does not render", "fix it")
        assert text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert 3 * len(text) < LIMITS.output_chars and time.monotonic() - start < LIMITS.seconds


@pytest.mark.parametrize(("template", "limits", "limit"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", {}, "steps"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", {}, "output_chars"),
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", {}, "int_bits"),
    ("{% for i in range(30) %}{% set s = 'a' * 9999999 %}{{ s|length }}{% endfor %}", {}, "work_chars"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
     {"seconds": 0.2, "steps": 10**12, "work_chars": 10**12}, "seconds"),
])
def test_each_limit_stops_a_render_and_names_itself(template, limits, limit):
    with pytest.raises(TemplateLimitError) as exc:
        render(template, {}, Limits(**limits))
    assert exc.value.limit == limit


def test_the_limits_bound_what_a_render_may_do_at_all():
    tight = Limits(steps=50, output_chars=100, work_chars=1000)
    assert render("{% for m in messages %}{{ m }}{% endfor %}", {"messages": ["a", "b"]}, tight) == "ab"
    with pytest.raises(TemplateLimitError, match="steps"):
        render("{% for i in range(60) %}{% endfor %}", {}, tight)
    with pytest.raises(TemplateLimitError, match="output size"):
        render("{{ 'a' * 101 }}", {}, tight)
    # A value can grow out of sight inside a variable, but not past the work limit.
    with pytest.raises(TemplateLimitError, match="work"):
        render("{% for i in range(20) %}{% set s = 'a' * 90 %}{% endfor %}", {}, tight)


def test_a_render_over_a_limit_is_a_refusal_that_names_the_limit_and_what_to_do():
    tok = _tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    with pytest.raises(BadInputError, match=r"went over the steps limit .* choose a built-in one with --chat-template"):
        render_chat(tok, CONVERSATIONS[0], "does not render", "fix it")


@pytest.mark.parametrize("template", [
    "{{ messages|tojson(indent=10000000) }}",
    "{{ 'a\nb'|indent(10000000) }}",
    "{% set s = 'a' * 9000000 %}{{ [s, s] }}",
    "{% set s = 'a' * 9000000 %}{{ [s] ~ [s] }}",
    "{% set s = 'a' * 9000000 %}{{ [[s, s]]|join }}",
])
def test_an_operation_that_would_make_too_much_is_refused_before_it_runs(template, monkeypatch):
    import json

    made = []
    monkeypatch.setattr(json, "dumps", lambda *a, **k: made.append(a) or "")
    with pytest.raises(TemplateLimitError, match="output size|tojson"):
        render(template, {"messages": [{"role": "user", "content": "hi"}]})
    assert made == []  # tojson refused before it ran


def test_the_sandbox_keeps_its_walls():
    for escape in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ [].append(1) }}",
                   "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(Exception) as exc:
            render(escape, {})
        assert not isinstance(exc.value, TemplateLimitError)
