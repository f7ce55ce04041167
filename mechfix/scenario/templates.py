"""Chat templates: the four built-in styles, a template from a file, and giving one to a tokenizer.

A chat model's own template (``tokenizer.chat_template``) is the ground truth
of what its agents see. ``--chat-template NAME|FILE`` gives one to a model
that has none (a base model, or a converted checkpoint that lost it). The
built-ins are written from each family's documented prompt format:

- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n``, generation prompt
  ``<|im_start|>assistant\\n`` (Qwen, many fine-tunes);
- ``llama3``: ``<|begin_of_text|>`` then
  ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``,
  generation prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``;
- ``gemma``: ``<bos>`` then ``<start_of_turn>user|model\\ncontent<end_of_turn>\\n``,
  a system message folded into the first user turn, roles alternating,
  generation prompt ``<start_of_turn>model\\n``;
- ``mistral``: ``<s>[INST] user [/INST]assistant</s>``, a system message
  folded into the first user turn, roles alternating, no generation prompt
  (the reply follows ``[/INST]``).

Each is a Jinja template of the kind transformers' ``apply_chat_template``
renders (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``). Every template, a built-in, a file's or
the model's own, is rendered by :func:`render_chat` in mechfix's limited
sandbox, never by ``apply_chat_template`` itself: a template is code from
someone else, and the sandbox bounds its time, steps and output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mechfix.errors import BadInputError

_ALTERNATE = ("{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")
_SYSTEM_FIRST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
                 "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
                 "{% set loop_messages = messages %}{% endif %}")

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}" + _SYSTEM_FIRST + "{% for message in loop_messages %}" + _ALTERNATE +
        "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\\n' + (system if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}" + _SYSTEM_FIRST + "{% for message in loop_messages %}" + _ALTERNATE +
        "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}

# The special tokens each built-in writes, so that a tokenizer that lacks them can be given them (tests, base models).
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": ("[INST]", "[/INST]"),
}


@dataclass(frozen=True)
class Template:
    """A chat template and where it came from.

    Attributes:
        name: A built-in's name, ``file:NAME`` for a file, or ``model`` for the tokenizer's own.
        source: The Jinja text.
    """

    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()


def template_file(spec: str | None) -> Path | None:
    """The file ``--chat-template`` names; None for a built-in's name, no value, or no file there."""
    if not spec or spec in BUILTIN_TEMPLATES or not Path(spec).is_file():
        return None
    return Path(spec)


def resolve_template(spec: str) -> Template:
    """A built-in template by name, or a Jinja template file.

    Raises:
        BadInputError: For an unknown name that is not a readable file.
    """
    if spec in BUILTIN_TEMPLATES:
        return Template(spec, BUILTIN_TEMPLATES[spec])
    path = template_file(spec)
    if path is None:
        raise BadInputError(
            f"--chat-template '{spec}' is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a file. "
            "Give one of those names, or the path of a Jinja chat template.")
    from mechfix.textio import read_text

    return Template(f"file:{path.name}", read_text(path, "chat template"))


def model_template(tokenizer) -> Template | None:
    """The tokenizer's own chat template, or None when it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one
        source = source.get("default")
    return Template("model", source) if isinstance(source, str) and source.strip() else None


def use_template(tokenizer, template: Template) -> None:
    """Give a tokenizer a template, and check that it renders a small conversation to some text.

    Raises:
        BadInputError: When the template does not render (a Jinja error, one it raises itself, a limit), or
            renders the conversation to nothing.
    """
    tokenizer.chat_template = template.source
    probe = [{"role": "system", "content": "You are Sam."}, {"role": "user", "content": "Ana: hello"},
             {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Ben: and now?"}]
    fix = "Fix the template, or choose a built-in one with --chat-template."
    text = render_chat(tokenizer, probe, f"chat template {template.name} does not render a four-message conversation",
                       fix, name=f"chat template {template.name}")
    if not text.strip():
        raise BadInputError(f"chat template {template.name} renders a four-message conversation to nothing, so the "
                            f"model would see no text. {fix}")


def render_chat(tokenizer, messages: list[dict], problem: str, fix: str, name: str = "the chat template") -> str:
    """The tokenizer's chat template over ``messages`` with the generation prompt, as ``apply_chat_template`` renders it.

    The template runs in mechfix's limited sandbox (:mod:`mechfix.scenario.sandbox`): it
    sees what transformers gives it (``messages``, ``add_generation_prompt``,
    the tokenizer's special tokens, ``tools`` and ``documents`` as None), and
    may spend no more than :data:`mechfix.scenario.sandbox.LIMITS`.

    Args:
        tokenizer: A tokenizer with a chat template.
        messages: The conversation (``role``, ``content`` and more fields); keys whose value is None are dropped,
            as transformers does.
        problem: What failed, for the message when the template fails ("the chat template does not render ...").
        fix: What to do then.
        name: What the template is, for the message when it goes over a limit.

    Raises:
        BadInputError: When the template fails, or goes over a limit (the message names which).
    """
    from mechfix.scenario.sandbox import TemplateLimitError, render

    template = model_template(tokenizer)
    if template is None:
        raise BadInputError(f"{problem}: the tokenizer has no chat template. {fix}")
    variables = {**tokenizer.special_tokens_map, "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
                 "tools": None, "documents": None, "add_generation_prompt": True}
    try:
        return render(template.source, variables)
    except TemplateLimitError as exc:
        raise BadInputError(
            f"{name} went {exc} while rendering {len(messages)} messages, and was stopped. mechfix runs "
            "chat templates in a sandbox with limits on time, steps, output and work far above what a real chat template "
            "needs; one that goes over them loops or grows without end. Check where the template came from, or choose a "
            "built-in one with --chat-template.") from None
    except Exception as exc:  # noqa: BLE001 - Jinja raises many kinds; all mean "does not render"
        raise BadInputError(f"{problem} ({type(exc).__name__}: {exc}). {fix}") from None
