"""Actor roles (trainer, generation engine) and the pure objectives the trainer runs."""
