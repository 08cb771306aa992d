"""Task families: where few-shot tasks come from. Plain numpy/torch, no Ray."""
