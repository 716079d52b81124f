"""The Ollama Modelfile shipped beside an exported GGUF, so that `ollama create NAME -f Modelfile`
works in the unpacked folder. Pure: text in, text out.

Ollama renders prompts with Go templates, not Jinja. For ChatML templates (`<|im_start|>role …
<|im_end|>`, SmolLM2's and the tiny model's) the Modelfile carries the equivalent Go template and
the template's default system prompt as SYSTEM (Ollama sends it when a chat has no system
message, as the Jinja template does). Other templates are left to Ollama, which reads
tokenizer.chat_template from the GGUF and matches it against the templates it knows.
"""

from __future__ import annotations

import re

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# System messages come in as .System (Ollama collects them there), so the loop skips them.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    "{{- range .Messages }}\n"
    '{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\n'
    "{{- end }}<|im_start|>assistant\n"
)
# The default system prompt in a ChatML Jinja template: its newline written raw or as \n.
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and IM_START in chat_template and IM_END in chat_template


def default_system(chat_template: str) -> str | None:
    m = _DEFAULT_SYSTEM.search(chat_template)
    return m.group(1) if m and "{" not in m.group(1) else None


def stop_tokens(chat_template: str | None, eos_token: str | None) -> list[str]:
    stops = [IM_START, IM_END] if is_chatml(chat_template) else []
    return stops + [eos_token] if eos_token and eos_token not in stops else stops


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile block cannot hold """')
    return f'"""{text}"""'


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None, adapter_name: str | None = None) -> str:
    """The Modelfile for `gguf_name` (a file in the same folder)."""
    lines = ["# ollama create MODEL_NAME -f Modelfile   (run in this folder)", f"FROM ./{gguf_name}"]
    if is_chatml(chat_template):
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
        if system := default_system(chat_template):
            lines.append(f"SYSTEM {_quoted(system)}")
    else:
        lines.append("# Not a ChatML template: Ollama takes the chat template from the GGUF's metadata.")
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(chat_template, eos_token)]
    if adapter_name:
        lines.append(f"# {adapter_name} is the LoRA alone, for the base model's GGUF: "
                     f"FROM <base>.gguf + ADAPTER ./{adapter_name}, or llama.cpp --lora.")
    return "\n".join(lines) + "\n"
