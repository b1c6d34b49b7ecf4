"""lora-plan: exact parameter, memory and checkpoint planning for full and LoRA fine-tuning.

Importing this package stays light (no torch, transformers or pandas) so that planning answers
instantly on a machine without a GPU.
"""

__version__ = "0.1.0"
