"""iReasoner: EvoLMM's loop with a reward for agreeing reasoning steps."""
