"""Wire formats clinical apps speak: OpenAI-compatible chat, Open Inference Protocol v2."""
