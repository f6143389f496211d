"""A small trained Wan-VACE proxy for quality benchmarks: procedural latent inpainting data, training, evaluation.

See ``benchmarks/proxy/README.md``. The scripts run from the repository root
(``python benchmarks/proxy/train.py``); other benchmarks import ``proxy.data`` / ``proxy.model``
with ``benchmarks/`` on ``sys.path`` (it is when they run as ``python benchmarks/<name>.py``).
"""
