"""The edit in other forms: LoRA adapter, control vector, and the Ollama and LM Studio folders."""
