"""The verification harness: real fine-tuning runs whose readings check the planner."""
