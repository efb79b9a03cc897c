"""splitnode: phase-split LLM serving on one machine."""
