"""One device: config, sequences, the paged KV pool, the batcher, the model runner, sampling and
the request outputs, and `LLM` on top. Imports model/ and kernels/, never the runtime, API or TUI."""
