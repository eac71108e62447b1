"""A folder for PYTHONPATH, not an import: its `sitecustomize` runs at start-up in every Python process of a
lerobot run that decodes with PyAV (see `lerobot_env.pyav_only`)."""
