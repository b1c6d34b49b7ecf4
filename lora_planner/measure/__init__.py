"""Measurement: real fine-tuning runs whose memory and speed are read and set beside the plan.

Importing this package stays light; torch and transformers are imported inside the functions
that train, so the `lora-plan measure` commands can be registered on the planning CLI.
"""
