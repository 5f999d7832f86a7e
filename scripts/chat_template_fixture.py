#!/usr/bin/env python3
"""Dev-only: renders chat templates the way transformers' `apply_chat_template` does (jinja2's
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `tojson`, the
`{% generation %}` block) and writes tests/fixtures/chat/cases.json, which `cargo test` compares bpo's renderer
(src/text/chat.rs, minijinja) against. Needs only jinja2: python3 scripts/chat_template_fixture.py
"""
import json
import pathlib

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: marks assistant text, renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render(source, messages, add_generation_prompt, special):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


# Templates written for these tests in the styles models ship: typed parts with images (llava-hf processors),
# Llama-2 [INST] with a system turn and bos_token, ChatML with string methods and loop variables.
TEMPLATES = {
    "parts": (
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{% if m['role'] != 'assistant' %}{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ c['text'] + ' ' }}{% endfor %}{% else %}{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ c['text'] + ' ' }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "inst": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
        "{% else %}{% set sys = false %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{% if m['role'] == 'user' %}{% if loop.first and sys %}{% set text = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + m['content'] %}"
        "{% else %}{% set text = m['content'] %}{% endif %}{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for m in messages %}\n"
        "  {% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}\n"
        "  <|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def user(text, image, parts):
    if not parts:
        return {"role": "user", "content": text}
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def main():
    cases = []
    questions = ["What is in the picture?", "  Describe it, please.\n", "Is there a dog? Answer yes or no."]
    for name, source in TEMPLATES.items():
        parts = name == "parts"
        for q in questions:
            for image in ([False, True] if parts else [False]):
                messages = [user(q, image, parts)]
                cases.append({"template": name, "parts": parts, "question": q, "image": image,
                              "expected": render(source, messages, True, SPECIAL)})
    out = {"templates": TEMPLATES, "special": SPECIAL, "cases": cases,
           "system_case": {"template": "inst", "messages": [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hello."},
                                                             {"role": "user", "content": "Bye"}]}}
    sc = out["system_case"]
    sc["expected"] = render(TEMPLATES["inst"], sc["messages"], False, SPECIAL)
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/chat/cases.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases) + 1} cases to {path}")


if __name__ == "__main__":
    main()
