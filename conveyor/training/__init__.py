"""Training: a typed request -> preflight -> `lerobot-train` subprocess -> archived, resumable checkpoints.

No Prefect here; `flows/train.py` and `tasks/train.py` wrap these functions.
"""
