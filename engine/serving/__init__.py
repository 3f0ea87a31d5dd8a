"""Serving many LongLoRA adapters of one base from one process (agents.server puts HTTP in front of it).

    pool = ModelPool("smollm2-135m", max_loaded=4)
    pool.register("my-run", "runs/my-run/train/adapter")
    worker = ServingWorker(pool)  # continuous batching across the base and every adapter; exact=True: serial
    job = worker.submit("my-run", worker.tokenize(chat_ids, [{"role": "user", "content": "Hi"}]),
                        SamplingParams(max_tokens=32, temperature=0))
    print(job.result().text)
"""

from engine.serving.generate import Completion, SamplingParams, chat_ids, generate, text_ids
from engine.serving.job import CancelledError, Job, JobGroup, QueueFullError, RequestTimeoutError
from engine.serving.logprobs import TokenLogprob, token_bytes, token_text
from engine.serving.pool import AdapterVerificationError, ModelPool, UnknownModelError
from engine.serving.worker import DEFAULT_MAX_TOKENS, ContextLengthError, ServingWorker

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "AdapterVerificationError",
    "CancelledError",
    "Completion",
    "ContextLengthError",
    "Job",
    "JobGroup",
    "ModelPool",
    "QueueFullError",
    "RequestTimeoutError",
    "SamplingParams",
    "ServingWorker",
    "TokenLogprob",
    "UnknownModelError",
    "chat_ids",
    "generate",
    "text_ids",
    "token_bytes",
    "token_text",
]
