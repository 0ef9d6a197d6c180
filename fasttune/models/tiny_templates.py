"""Chat templates of the tiny VLMs' processors (:class:`fasttune.models.spec.TinyVisionSpec`), as data.

Each renders ``messages`` whose content is a string or a list of ``{"type": "text", "text": ...}`` /
``{"type": "image"}`` parts, in the layout of a released template; ``IMAGE`` stands for one image (the family's
``image_marker``). The family files pick theirs.
"""

PARTS = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
         "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
         "{% endfor %}{% endif %}")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + PARTS + "<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n" + PARTS + "<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n" + PARTS
          + "<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
USER_ASSISTANT = ("{% for m in messages %}{{ 'USER' if m['role'] == 'user' else 'ASSISTANT' if m['role'] == 'assistant' "
                  "else 'SYSTEM' }}: " + PARTS + "{{ eos_token if m['role'] == 'assistant' else '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
