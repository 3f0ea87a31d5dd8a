"""Planning: from a Spec to a Plan that fits, torch-free. `plan` makes one plan (memory, time, DeepSpeed stage),
`params` counts parameters, `cost` prices FLOPs and time, `sequence_parallel` models Ulysses SP, `search` offers the
levers, `checks` verifies a plan artifact, `rope_choice` measures RoPE methods on the real model (the one part that
loads torch, imported only when scoring)."""
