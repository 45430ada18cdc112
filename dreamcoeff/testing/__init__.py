"""Offline stand-ins for SDXL: the tiny random pipeline (tests) and the micro world (benchmark, demo).

Both build real diffusers ``StableDiffusionXLPipeline`` objects from configs only, so every code path
of the trainer and the sampler runs on them exactly as on SDXL, only smaller. Benchmarks and tests
import their public names from ``dreamcoeff.testing.tiny`` and ``dreamcoeff.testing.microworld``.
"""
