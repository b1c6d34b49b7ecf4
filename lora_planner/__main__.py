"""`python -m lora_planner ...` runs the `lora-plan` command."""

from .cli import main

main(prog_name="lora-plan")
