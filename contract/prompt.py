"""Turn an example into chat messages and render them with the base model's chat template.

Training renders its prompts here and serving hands vLLM the same template from
the manifest, so the string the adapter learned on is the string it is served:
a train/serve template mismatch is the most common silent quality loss in
fine-tuning.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contract.tools import tools_system_prompt

Message = dict[str, str]


def example_messages(example: dict[str, Any]) -> list[Message]:
    """The user turn of an ``{"instruction", "input"?}`` example."""
    instruction = str(example["instruction"]).strip()
    extra = str(example.get("input") or "").strip()
    content = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": content}]


def with_tools(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """``messages`` with the functions presented in the system turn (merged into one that is there)."""
    if not tools:
        return messages
    text = tools_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


@lru_cache(maxsize=32)
def _compile(chat_template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(chat_template)


def render(
    chat_template: str,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` exactly as Hugging Face's ``apply_chat_template`` would."""
    return str(
        _compile(chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    )


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts plain text with its ``<bos>`` (Gemma's does; SmolLM2's does not)."""
    return bool(tokenizer.bos_token) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
