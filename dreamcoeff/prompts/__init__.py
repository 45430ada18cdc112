"""The sampler's prompt files (package data, read with importlib.resources by dreamcoeff.sample.prompts)."""
