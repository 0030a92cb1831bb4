"""Training: fine-tune jobs on a backend (OpenAI's API or this machine), and students."""
