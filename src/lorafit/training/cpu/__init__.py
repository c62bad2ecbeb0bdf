"""CPU-specific tuning of a training run: frozen products in halves of rows (rowsplit), the allocator and peak
memory windows (memory). Applied by the training runtime and the entry points; the core knows none of it."""
