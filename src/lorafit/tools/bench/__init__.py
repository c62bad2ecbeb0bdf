"""Benchmarks: `lorafit bench train` (lorafit vs PEFT vs full fine-tuning) and `lorafit bench latency`.

They report speed and memory; they assert nothing. Every figure comes with the machine it was measured on.
"""
