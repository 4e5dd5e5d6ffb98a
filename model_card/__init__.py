"""The Hub model card: template and generator (see generate.py)."""
