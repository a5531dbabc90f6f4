"""Recipes: one folder per seed system (config, prompts, rewards, phases); base.py the interface."""
