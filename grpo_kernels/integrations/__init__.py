"""Drop-ins for RL trainers. Each submodule imports its trainer library, so import the one you use:
`grpo_kernels.integrations.trl` (TRL 1.16's GRPOTrainer)."""
