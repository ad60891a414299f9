"""Inference engines. `llama_cpp` is imported only inside the runner child process."""
