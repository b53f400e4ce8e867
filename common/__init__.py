"""Plumbing shared by the method files: nothing here is about any one paper."""
