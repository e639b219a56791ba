"""Training machinery shared by the passes that fine-tune: knowledge distillation from the
graph a pipeline started from, with checked batches, in bounded memory."""
