"""EvoLMM: Proposer and Solver LoRA adapters on one backbone, self-consistency rewards."""
