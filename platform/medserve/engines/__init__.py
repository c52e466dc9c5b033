"""Model runtimes behind one interface: llama.cpp, ONNX Runtime, vLLM.

An engine is plain Python and knows nothing of Ray; `serve_app` wraps any
engine in a Ray Serve deployment that the gateway reaches by handle.
"""
