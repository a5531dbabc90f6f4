"""Recipes and driver-side math (rewards, advantages) that feed the actors."""
