"""Measurement: real fine-tuning runs whose memory and speed are read and set beside the plan.

Importing this package stays light; torch and transformers are imported inside the functions
that train, so the `lora-plan measure` commands can be registered on the planning CLI.
"""

import logging

# bitsandbytes 0.50 and later, imported by PEFT, tries on a CPU with AVX512-bf16 to load an optional
# kernel from the Hugging Face Hub and logs a warning when it cannot (offline, or not trusted); its
# own kernel runs instead. Nothing in it is the user's to act on, and it would be every command's
# first line of stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
