"""Helpers shared by the tests and the bench scripts; conftest.py files only wrap them in fixtures.

    tests.support.models         tiny random Llamas, the byte tokenizer, saved model dirs, datasets, adapters
    tests.support.servers        free_port, the real OpenAI-compatible server (live_server), `python app.py`
    tests.support.openai_server  a scripted chat-completions server for the LLM paths (no live API, no patching)

Nothing here imports a test module (test_*.py, conftest.py) or pytest, so the bench scripts can import it too (GPU
images have torch and transformers, not pytest or datasets: heavier imports stay inside the functions).
"""
