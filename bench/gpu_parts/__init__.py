"""The GPU suite's parts (bench/gpu_suite.py): attention timing, 7B-shaped training, the 8k -> 32k extension."""
