"""MM-Zero: Proposer, CodeGen and Solver co-evolving through rendered SVG images."""
