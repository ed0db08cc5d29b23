"""`./launch.sh train`: fine-tune the base with the grafted modules under DeepSpeed.

main (the entry point) -> Trainer (the loop) with its components: strategy (the only DeepSpeed
code), data (the batch plan), checkpoint (the checkpointer), validate (held-out metrics),
tracking (MLflow), curves (learning curves at the end), runcheck (refusals before launch).
"""
