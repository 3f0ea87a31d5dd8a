"""The four roles of the SOP (planner, data engineer, trainer, evaluator): each turns verified inputs into
the artifacts of its stage and registers that stage action with sop.stages."""
