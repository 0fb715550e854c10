"""Drop-ins for RL trainers. Each submodule imports its trainer library, so import the one you use:
`grpo_kernels.integrations.trl` (TRL 1.16's GRPOTrainer), `grpo_kernels.integrations.verl` (verl 0.9.1's
policy losses; imports verl only when it is installed)."""
